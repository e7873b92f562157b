//! What a capability hooks, as data: each kernel function (or tracepoint),
//! its programs per attach method, the prototype they expect, and what must
//! be hooked before it. The planner and the attacher read nothing else.

use serde::Serialize;

use super::Role;

/// How a program reaches its kernel function.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Method {
    /// fentry/fexit through a BPF trampoline (vmlinux functions in BTF).
    Fentry,
    /// kprobe/kretprobe on the exact symbol (vmlinux or a module).
    Kprobe,
    /// A classic tracepoint.
    Tracepoint,
}

impl Method {
    pub fn name(self) -> &'static str {
        match self {
            Self::Fentry => "fentry",
            Self::Kprobe => "kprobe",
            Self::Tracepoint => "tracepoint",
        }
    }
}

/// The programs of one hook (their names in the eBPF object), per method.
/// An entry and an exit of the same method make a bracket.
#[derive(Clone, Copy, Debug)]
pub struct Programs {
    pub fentry: Option<&'static str>,
    pub fexit: Option<&'static str>,
    pub kprobe: Option<&'static str>,
    pub kretprobe: Option<&'static str>,
    /// A classic tracepoint's program: the spec's function is the
    /// tracepoint's name, this its category (`net`).
    pub tracepoint: Option<Tracepoint>,
}

#[derive(Clone, Copy, Debug)]
pub struct Tracepoint {
    pub category: &'static str,
    pub program: &'static str,
}

const NO_PROGRAMS: Programs = Programs {
    fentry: None,
    fexit: None,
    kprobe: None,
    kretprobe: None,
    tracepoint: None,
};

/// How the programs of one method are attached.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Pairing {
    /// One program.
    Single(&'static str),
    /// Entry and exit: the exit is attached first and detached again if
    /// the entry fails (an exit without its entry is ignored; an entry
    /// without its exit would leave a frame open).
    Bracket {
        entry: &'static str,
        exit: &'static str,
    },
}

impl Programs {
    /// The programs `method` attaches, if this hook has any for it.
    pub fn pairing(&self, method: Method) -> Option<Pairing> {
        let (entry, exit) = match method {
            Method::Fentry => (self.fentry, self.fexit),
            Method::Kprobe => (self.kprobe, self.kretprobe),
            Method::Tracepoint => (self.tracepoint.map(|t| t.program), None),
        };
        match (entry, exit) {
            (Some(entry), Some(exit)) => Some(Pairing::Bracket { entry, exit }),
            (Some(single), None) | (None, Some(single)) => Some(Pairing::Single(single)),
            (None, None) => None,
        }
    }

    /// The word for `method` on this hook: an exit-only hook is a `fexit`
    /// or `kretprobe`.
    pub fn method_name(&self, method: Method) -> &'static str {
        match method {
            Method::Fentry if self.fentry.is_none() => "fexit",
            Method::Kprobe if self.kprobe.is_none() => "kretprobe",
            other => other.name(),
        }
    }

    /// Every program name, for checks against the object.
    pub fn names(&self) -> impl Iterator<Item = &'static str> {
        [self.fentry, self.fexit, self.kprobe, self.kretprobe]
            .into_iter()
            .chain([self.tracepoint.map(|t| t.program)])
            .flatten()
    }
}

/// The argument layout the programs were written for, checked against the
/// function's BTF prototype.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Prototype {
    Any,
    /// The argument named `skb` is at this index (0-based); the function
    /// must be in BTF to tell.
    SkbAt(usize),
    /// As `SkbAt`, but a function without BTF is trusted: kprobes read
    /// registers, and every kernel since 4.4 has this layout.
    SkbAtOrNoBtf(usize),
    /// fexit reads the return value after exactly this many arguments
    /// (kretprobes read it from a register: they do not care).
    ExitAfterArgs(usize),
}

/// What must hold before a hook is attempted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Needs {
    Nothing,
    /// Only some kernels have the function: without BTF for it, it is not
    /// planned (and not listed as missing).
    InBtf,
    /// Only when this earlier hook attached (else not listed).
    Hooked(&'static str),
    /// Completes this earlier hook, which must be an fentry (else not
    /// listed if it did not attach, missing if it is a kprobe).
    HookedByFentry(&'static str),
    /// A fallback for these earlier hooks: only when none of them attached
    /// (else not listed); once it attached, they are not listed as missing.
    Unhooked(&'static [&'static str]),
}

/// One set of programs and the prototype it was written for.
#[derive(Clone, Copy, Debug)]
pub struct Variant {
    pub prototype: Prototype,
    pub programs: Programs,
}

/// One hook of a capability.
#[derive(Clone, Copy, Debug)]
pub struct HookSpec {
    pub function: &'static str,
    pub role: Role,
    pub needs: Needs,
    /// For kernels whose prototypes differ: the first that matches.
    pub variants: &'static [Variant],
}

impl HookSpec {
    pub const fn new(function: &'static str, role: Role, variants: &'static [Variant]) -> Self {
        Self {
            function,
            role,
            needs: Needs::Nothing,
            variants,
        }
    }

    pub const fn needs(self, needs: Needs) -> Self {
        Self { needs, ..self }
    }

    /// Whether this is a classic tracepoint rather than a function.
    pub fn is_tracepoint(&self) -> bool {
        self.variants
            .iter()
            .any(|v| v.programs.tracepoint.is_some())
    }
}

impl Variant {
    /// fentry/fexit and kprobe/kretprobe brackets.
    pub const fn bracket(
        fentry: &'static str,
        fexit: &'static str,
        kprobe: &'static str,
        kretprobe: &'static str,
    ) -> Self {
        Self {
            prototype: Prototype::Any,
            programs: Programs {
                fentry: Some(fentry),
                fexit: Some(fexit),
                kprobe: Some(kprobe),
                kretprobe: Some(kretprobe),
                tracepoint: None,
            },
        }
    }

    /// An entry program as fentry, else as kprobe.
    pub const fn entry(fentry: &'static str, kprobe: &'static str) -> Self {
        Self {
            prototype: Prototype::Any,
            programs: Programs {
                fentry: Some(fentry),
                kprobe: Some(kprobe),
                ..NO_PROGRAMS
            },
        }
    }

    /// An exit program as fexit, else (if any) as kretprobe.
    pub const fn exit(fexit: &'static str, kretprobe: Option<&'static str>) -> Self {
        Self {
            prototype: Prototype::Any,
            programs: Programs {
                fexit: Some(fexit),
                kretprobe,
                ..NO_PROGRAMS
            },
        }
    }

    /// An exit program as fexit, else as a kprobe/kretprobe pair (the
    /// kprobe keeps the arguments the kretprobe cannot read).
    pub const fn exit_or_kprobe_pair(
        fexit: &'static str,
        kprobe: &'static str,
        kretprobe: &'static str,
    ) -> Self {
        Self {
            prototype: Prototype::Any,
            programs: Programs {
                fexit: Some(fexit),
                kprobe: Some(kprobe),
                kretprobe: Some(kretprobe),
                ..NO_PROGRAMS
            },
        }
    }

    /// A classic tracepoint program of `category`.
    pub const fn tracepoint(category: &'static str, program: &'static str) -> Self {
        Self {
            prototype: Prototype::Any,
            programs: Programs {
                tracepoint: Some(Tracepoint { category, program }),
                ..NO_PROGRAMS
            },
        }
    }

    pub const fn prototype(self, prototype: Prototype) -> Self {
        Self { prototype, ..self }
    }
}
