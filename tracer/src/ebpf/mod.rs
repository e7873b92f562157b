//! The embedded eBPF object and how it is loaded into the running kernel.

use aya::{
    Btf, Ebpf, EbpfLoader,
    programs::{FEntry, FExit, KProbe, Program, TracePoint, kprobe::KProbeLinkId},
};
use tracer_common::{
    ike::NetRecords,
    layout::{ABSENT, KernelOffsets, KfreeSkbRecord, OffsetSource},
    names::{globals, maps},
};

use crate::{
    btf::{BtfError, KernelBtf},
    counters::Counters,
    kallsyms::Kallsyms,
    tracefs::{self, TracefsError},
};

/// Built by `tracer/build.rs` from `tracer-ebpf`, so the binary is one file.
pub(crate) static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/tracer"));

#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error(
        "this xfrm-trace was built without its eBPF programs (AYA_BUILD_SKIP); rebuild it normally"
    )]
    NoObject,
    #[error(transparent)]
    Btf(#[from] BtfError),
    #[error(transparent)]
    Tracefs(#[from] TracefsError),
    #[error("loading the eBPF object: {0}")]
    Load(#[from] aya::EbpfError),
}

/// Everything the programs need to know about the running kernel.
#[derive(Clone, Copy, Debug)]
pub struct KernelLayout {
    pub offsets: KernelOffsets,
    pub kfree_skb: KfreeSkbRecord,
    /// ABSENT where tracefs lacks the net tracepoints (the IKE watch is off).
    pub net: NetRecords,
    /// CPUs the kernel may bring up (0 if unknown: no per-CPU sums).
    pub possible_cpus: u32,
}

impl KernelLayout {
    /// Resolves offsets from BTF and the kfree_skb record from tracefs.
    pub fn resolve(btf: &KernelBtf, kallsyms: &Kallsyms) -> Result<Self, LoadError> {
        let offsets = kernel_offsets(btf, kallsyms)?;
        let format = tracefs::format("skb", "kfree_skb")?;
        let field = |name: &str| {
            tracefs::field_offset(&format, name).ok_or_else(|| TracefsError::NoField {
                tracepoint: "skb:kfree_skb".into(),
                field: name.into(),
            })
        };
        let kfree_skb = KfreeSkbRecord {
            skbaddr: field("skbaddr")?,
            location: field("location")?,
            protocol: field("protocol")?,
            // Drop reasons arrived in 5.17.
            reason: tracefs::field_offset(&format, "reason").unwrap_or(ABSENT),
        };
        let skbaddr = |name: &str| {
            tracefs::format("net", name)
                .ok()
                .and_then(|format| tracefs::field_offset(&format, "skbaddr"))
                .unwrap_or(ABSENT)
        };
        let net = NetRecords {
            dev_queue_skbaddr: skbaddr("net_dev_queue"),
            receive_skbaddr: skbaddr("netif_receive_skb"),
        };
        let possible_cpus = aya::util::nr_cpus().ok().map(u32::from).unwrap_or(0);
        Ok(Self {
            offsets,
            kfree_skb,
            net,
            possible_cpus,
        })
    }
}

/// Every `KernelOffsets` field: the member offsets by the table (a missing
/// required member fails, an optional one is ABSENT and the programs skip
/// what needs it), then the values that are not member offsets.
fn kernel_offsets(btf: &KernelBtf, kallsyms: &Kallsyms) -> Result<KernelOffsets, BtfError> {
    let mut offsets = KernelOffsets::UNSET;
    for field in KernelOffsets::FIELDS {
        *(field.slot)(&mut offsets) = match field.source {
            OffsetSource::Required { ty, path } => btf.member_offset(ty, path)?,
            OffsetSource::Optional { ty, path } => btf.optional_offset(ty, path).unwrap_or(ABSENT),
            OffsetSource::Computed => continue,
        };
    }
    offsets.xfrm_counters = Counters::from_btf(btf).map_or(0, |c| c.array_len);
    // skb_ext_find() indexes a u8 bitmap and offset array by this value.
    offsets.skb_ext_sec_path = btf
        .enum_values("skb_ext_id")
        .and_then(|values| {
            let (_, value) = values.into_iter().find(|(n, _)| n == "SKB_EXT_SEC_PATH")?;
            u32::try_from(value).ok().filter(|&v| v < 8)
        })
        .unwrap_or(ABSENT);
    offsets.per_cpu_offset = kallsyms.data_address("__per_cpu_offset").unwrap_or(0);
    if let Some((original, reply)) = conntrack_tuples(btf) {
        offsets.ct_original_tuple = original;
        offsets.ct_reply_tuple = reply;
    }
    Ok(offsets)
}

/// Where `nf_conn.tuplehash[IP_CT_DIR_ORIGINAL].tuple` and
/// `tuplehash[IP_CT_DIR_REPLY].tuple` are: the array's first and second
/// element, each a `struct nf_conntrack_tuple_hash`.
fn conntrack_tuples(btf: &KernelBtf) -> Option<(u32, u32)> {
    let array = btf.optional_offset("nf_conn", "tuplehash")?;
    let tuple = btf.optional_offset("nf_conntrack_tuple_hash", "tuple")?;
    let element = btf.struct_size("nf_conntrack_tuple_hash")?;
    let original = array.checked_add(tuple)?;
    Some((original, original.checked_add(element)?))
}

/// Loads the object (maps created, no program loaded or attached yet), with
/// room for `shadows` netns in the diff at the drop (`attribution::claims`).
pub fn load(
    layout: Option<&KernelLayout>,
    btf: Option<&Btf>,
    shadows: u32,
) -> Result<Ebpf, LoadError> {
    if OBJECT.is_empty() {
        return Err(LoadError::NoObject);
    }
    raise_memlock_limit();
    let mut loader = EbpfLoader::new();
    if let Some(btf) = btf {
        loader.btf(btf);
    }
    if let Some(layout) = layout {
        loader
            .override_global(globals::KERNEL_OFFSETS, &layout.offsets, true)
            .override_global(globals::KFREE_SKB_RECORD, &layout.kfree_skb, true)
            .override_global(globals::NET_RECORDS, &layout.net, true)
            .override_global(globals::POSSIBLE_CPUS, &layout.possible_cpus, true);
    }
    loader.map_max_entries(maps::SHADOWS, shadows);
    Ok(loader.load(OBJECT)?)
}

/// Kernels before 5.11 charge BPF maps to RLIMIT_MEMLOCK (docs/kernel.md §6).
fn raise_memlock_limit() {
    let unlimited = libc::rlimit {
        rlim_cur: libc::RLIM_INFINITY,
        rlim_max: libc::RLIM_INFINITY,
    };
    // SAFETY: setrlimit only reads the struct we pass.
    let ret = unsafe { libc::setrlimit(libc::RLIMIT_MEMLOCK, &unlimited) };
    if ret != 0 {
        log::debug!(
            "could not raise RLIMIT_MEMLOCK: {}",
            std::io::Error::last_os_error()
        );
    }
}

/// One sample channel as userspace sees it: the ring the programs send to
/// (a per-CPU budget and a lost count on their side, `capture::reserve`),
/// drained every tick; the first `limit` samples are kept, every one is
/// counted.
pub struct Sampler<T> {
    ring: Option<aya::maps::RingBuf<aya::maps::MapData>>,
    kept: Vec<T>,
    received: u64,
    limit: usize,
}

impl<T: aya::Pod> Sampler<T> {
    /// Takes the ring `map` out of the object (`None` inside if the object
    /// has no such ring: nothing is ever received).
    pub fn take(ebpf: &mut Ebpf, map: &str, limit: usize) -> Self {
        let ring = ebpf
            .take_map(map)
            .and_then(|m| aya::maps::RingBuf::try_from(m).ok());
        Self {
            ring,
            kept: Vec::new(),
            received: 0,
            limit,
        }
    }

    /// Reads what the programs sent since the last call.
    pub fn drain(&mut self) {
        let Some(ring) = self.ring.as_mut() else {
            return;
        };
        while let Some(item) = ring.next() {
            if item.len() < size_of::<T>() {
                continue;
            }
            self.received += 1;
            if self.kept.len() >= self.limit {
                continue;
            }
            // SAFETY: T is plain repr(C) data and the item is at least that long.
            self.kept
                .push(unsafe { std::ptr::read_unaligned(item.as_ptr().cast::<T>()) });
        }
    }

    /// Drains, and hands over what was kept (a channel read as a stream).
    pub fn take_kept(&mut self) -> Vec<T> {
        self.drain();
        std::mem::take(&mut self.kept)
    }

    /// Whether the object had the ring.
    pub fn is_open(&self) -> bool {
        self.ring.is_some()
    }

    /// Drains a last time and lets go of the ring.
    pub fn close(&mut self) {
        self.drain();
        self.ring = None;
    }

    /// The samples kept (the first `limit`).
    pub fn kept(&self) -> &[T] {
        &self.kept
    }

    /// Every sample received, kept or not.
    pub fn received(&self) -> u64 {
        self.received
    }
}

/// A program of the object, as its type (`FEntry`, `TracePoint`, ...).
pub fn program<'a, T>(ebpf: &'a mut Ebpf, name: &str) -> Result<&'a mut T, String>
where
    &'a mut T: TryFrom<&'a mut Program, Error = aya::programs::ProgramError>,
{
    ebpf.program_mut(name)
        .ok_or_else(|| format!("program {name} missing from the object"))?
        .try_into()
        .map_err(|e: aya::programs::ProgramError| describe(&e))
}

/// Verifies fentry/fexit programs, each `(program, kernel function)`, on
/// several threads at once: the verifier runs in the loading thread, and
/// under emulation verifying is most of a start. What fails here is left
/// for the attach that follows, which loads what is not loaded yet and
/// reports why.
pub fn preload(ebpf: &mut Ebpf, programs: &[(&str, &str)], btf: &Btf) {
    let mut wanted: std::collections::HashMap<&str, &str> = programs.iter().copied().collect();
    let jobs: Vec<(&str, &mut Program, &str)> = ebpf
        .programs_mut()
        .filter_map(|(name, program)| Some((name, program, wanted.remove(name)?)))
        .collect();
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get().min(4));
    let queue = std::sync::Mutex::new(jobs);
    std::thread::scope(|scope| {
        for _ in 0..threads {
            scope.spawn(|| {
                loop {
                    let job = queue.lock().unwrap_or_else(|e| e.into_inner()).pop();
                    let Some((name, program, function)) = job else {
                        return;
                    };
                    let started = std::time::Instant::now();
                    let result = match program {
                        Program::FEntry(p) => p.load(function, btf),
                        Program::FExit(p) => p.load(function, btf),
                        _ => continue,
                    };
                    if result.is_ok() {
                        log::debug!("{name}: loaded in {:?} (in parallel)", started.elapsed());
                    }
                }
            });
        }
    });
}

pub fn attach_fentry(ebpf: &mut Ebpf, name: &str, function: &str, btf: &Btf) -> Result<(), String> {
    let prog: &mut FEntry = program(ebpf, name)?;
    let started = std::time::Instant::now();
    if prog.fd().is_err() {
        prog.load(function, btf).map_err(|e| describe(&e))?;
    }
    let loaded = started.elapsed();
    prog.attach().map(drop).map_err(|e| describe(&e))?;
    log_cost(name, loaded, started.elapsed() - loaded);
    Ok(())
}

pub fn attach_fexit(ebpf: &mut Ebpf, name: &str, function: &str, btf: &Btf) -> Result<(), String> {
    let prog: &mut FExit = program(ebpf, name)?;
    let started = std::time::Instant::now();
    if prog.fd().is_err() {
        prog.load(function, btf).map_err(|e| describe(&e))?;
    }
    let loaded = started.elapsed();
    prog.attach().map(drop).map_err(|e| describe(&e))?;
    log_cost(name, loaded, started.elapsed() - loaded);
    Ok(())
}

/// Attaches a kprobe or kretprobe program (loading it on first use: the
/// same program may serve several functions).
pub fn attach_kprobe(ebpf: &mut Ebpf, name: &str, function: &str) -> Result<KProbeLinkId, String> {
    let prog: &mut KProbe = program(ebpf, name)?;
    let started = std::time::Instant::now();
    if prog.fd().is_err() {
        prog.load().map_err(|e| describe(&e))?;
    }
    let loaded = started.elapsed();
    let link = prog.attach(function, 0).map_err(|e| describe(&e))?;
    log_cost(name, loaded, started.elapsed() - loaded);
    Ok(link)
}

/// Loads a classic tracepoint program and attaches it to `category:name`.
pub fn attach_tracepoint(
    ebpf: &mut Ebpf,
    program_name: &str,
    category: &str,
    name: &str,
) -> Result<(), String> {
    let prog: &mut TracePoint = program(ebpf, program_name)?;
    prog.load().map_err(|e| describe(&e))?;
    prog.attach(category, name)
        .map(drop)
        .map_err(|e| describe(&e))
}

/// What a program cost to start (`-vv`): verifying, then attaching.
fn log_cost(name: &str, loaded: std::time::Duration, attached: std::time::Duration) {
    log::debug!("{name}: loaded in {loaded:?}, attached in {attached:?}");
}

/// An error and its causes on one line, each said once (aya nests the
/// errno and the verifier log in its sources, and many of its errors
/// already print their source: without this a cause came out three times).
pub fn describe(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        if !text.contains(&cause_text) {
            text.push_str(": ");
            text.push_str(&cause_text);
        }
        source = cause.source();
    }
    text
}

/// The embedded object, parsed as the loader parses it (for unit tests that
/// check names against it).
#[cfg(test)]
pub(crate) fn parsed_object() -> aya_obj::Object {
    assert!(
        !OBJECT.is_empty(),
        "built without the eBPF object (AYA_BUILD_SKIP)"
    );
    aya_obj::Object::parse(OBJECT).expect("the embedded object parses")
}

#[cfg(test)]
mod tests {
    use super::*;
    use tracer_common::names::{maps, programs};

    #[derive(Debug, thiserror::Error)]
    #[error("Operation not permitted (os error 1)")]
    struct Denied;
    #[derive(Debug, thiserror::Error)]
    #[error("failed to create map `SOURCES`: {0}")]
    struct CreateMap(#[source] Denied);
    #[derive(Debug, thiserror::Error)]
    #[error("map error: {0}")]
    struct MapError(#[source] CreateMap);
    #[derive(Debug, thiserror::Error)]
    #[error("loading the eBPF object")]
    struct Loading(#[source] MapError);

    #[test]
    fn every_map_named_in_tracer_common_is_in_the_object_and_back() {
        let object = parsed_object();
        for name in maps::ALL.iter().chain(maps::KERNEL_ONLY) {
            assert!(
                object.maps.contains_key(*name),
                "map {name} not in the object"
            );
        }
        // Data sections hold the globals; AYA_LOGS carries aya-log's records.
        let internal = [".rodata", ".data", ".bss", "AYA_LOGS"];
        let mut unlisted: Vec<&String> = object
            .maps
            .keys()
            .filter(|name| {
                let name = name.as_str();
                !maps::ALL.contains(&name)
                    && !maps::KERNEL_ONLY.contains(&name)
                    && !internal.iter().any(|section| name.starts_with(section))
            })
            .collect();
        unlisted.sort();
        assert!(unlisted.is_empty(), "maps not in names::maps: {unlisted:?}");
    }

    #[test]
    fn every_program_named_in_tracer_common_is_in_the_object_and_back() {
        let object = parsed_object();
        let mut in_object: Vec<&str> = object.programs.keys().map(String::as_str).collect();
        in_object.sort_unstable();
        let mut named = programs::ALL.to_vec();
        named.sort_unstable();
        assert_eq!(in_object, named);
    }

    #[test]
    fn every_global_named_in_tracer_common_is_in_the_object() {
        let btf = parsed_object().btf.expect("the object has BTF");
        for name in globals::ALL {
            let found = btf.id_by_type_name_kind(name, aya_obj::btf::BtfKind::Var);
            assert!(found.is_ok(), "global {name} not in the object's BTF");
        }
    }

    #[test]
    fn every_offset_resolves_from_this_kernels_btf() {
        let btf = match KernelBtf::running() {
            Ok(btf) => btf,
            Err(e) => {
                eprintln!("no kernel BTF ({e}): skipped");
                return;
            }
        };
        let kallsyms = Kallsyms::parse("ffffffff83a1b400 D __per_cpu_offset\n");
        let mut offsets = kernel_offsets(&btf, &kallsyms).unwrap();
        let mut unset = KernelOffsets::UNSET;
        for field in KernelOffsets::FIELDS {
            let value = *(field.slot)(&mut offsets);
            let name = field.name;
            match field.source {
                OffsetSource::Required { ty, path } => {
                    assert_ne!(value, ABSENT, "{name}");
                    assert_eq!(Some(value), btf.member_offset(ty, path).ok(), "{name}");
                }
                OffsetSource::Optional { ty, path } => {
                    assert_eq!(
                        value,
                        btf.optional_offset(ty, path).unwrap_or(ABSENT),
                        "{name}"
                    );
                }
                // A kernel with XFRM statistics and skb extensions has a
                // value for each: one left UNSET has no code in resolve.
                OffsetSource::Computed => {
                    assert_ne!(value, *(field.slot)(&mut unset), "{name}");
                }
            }
        }
        // The same on every 64-bit kernel: after next and prev, then sk.
        assert_eq!((offsets.sk_buff_dev, offsets.sk_buff_sk), (16, 24));
        assert_eq!(offsets.per_cpu_offset, 0xffff_ffff_83a1_b400);
    }

    #[test]
    fn each_cause_is_said_once() {
        assert_eq!(
            describe(&Loading(MapError(CreateMap(Denied)))),
            "loading the eBPF object: map error: failed to create map `SOURCES`: Operation not permitted (os error 1)"
        );
    }
}
