//! `xfrm-trace lab <scenario>`: reproduce a classic IPsec failure in a lab
//! of network namespaces, show xfrm-trace diagnosing it, apply the fix,
//! show it working, and clean up.

pub mod masquerade;
pub mod mtu;

use std::sync::{
    Arc,
    atomic::{AtomicBool, Ordering},
};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};

use crate::{hooks::HookChoice, report::Report, trace};

/// Numbered progress lines.
struct Step {
    done: usize,
    total: usize,
}

impl Step {
    fn new(total: usize) -> Self {
        Self { done: 0, total }
    }

    fn say(&mut self, text: &str) {
        self.done += 1;
        println!("[{}/{}] {text}", self.done, self.total);
    }
}

/// Runs the tracer (in this process) while `action` runs; its report.
fn trace_during(hooks: HookChoice, action: impl FnOnce()) -> anyhow::Result<Report> {
    // In a directory only we can enter (0700, an unpredictable name):
    // nobody can plant the ready file, nor a link where it goes.
    let private = tempfile::Builder::new()
        .prefix("xfrm-trace-lab-")
        .tempdir()
        .context("creating a private temporary directory")?;
    let ready = private.path().join("ready");
    let stop = Arc::new(AtomicBool::new(false));
    let options = trace::Options {
        duration: None,
        ready_file: Some(ready.clone()),
        live: false,
        hooks,
        brackets: false,
        pluto_sockets: Vec::new(),
        filter: Default::default(),
        interval: Duration::from_secs(1),
        prometheus: None,
        stop: Some(stop.clone()),
    };
    std::thread::scope(|scope| {
        let tracer = scope.spawn(|| trace::run(&options).map(|outcome| outcome.report));
        let started = Instant::now();
        while !ready.exists() {
            if tracer.is_finished() || started.elapsed() > Duration::from_secs(120) {
                stop.store(true, Ordering::Relaxed);
                return match tracer.join() {
                    Ok(Err(e)) => Err(e.context("starting xfrm-trace")),
                    _ => bail!("xfrm-trace did not attach within 120 s"),
                };
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        action();
        // Let the last packets' events land before reading the maps.
        std::thread::sleep(Duration::from_millis(500));
        stop.store(true, Ordering::Relaxed);
        tracer
            .join()
            .map_err(|_| anyhow::anyhow!("tracer thread panicked"))?
            .context("xfrm-trace")
    })
}
