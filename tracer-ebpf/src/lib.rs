//! Library target so that `tracer` can list this crate as a build
//! dependency (cargo then rebuilds the embedded object when it changes).
#![no_std]
