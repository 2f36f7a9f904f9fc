//! NCCL collectives for GPU workers, loaded at run time.
//!
//! # Loading
//! The crate builds and its tests run with no CUDA present: nothing links against NCCL or the CUDA driver.
//! Types (`ncclUniqueId`, `ncclComm_t`, `ncclConfig_t` of NCCL 2.28, data types, reduction ops) come from
//! `cudarc::nccl::sys` (feature `nccl-02028`, matching the NCCL 2.28.9 that PyTorch 2.11 ships) and the CUDA
//! driver API (primary context, stream polling) from `cudarc::driver`, which finds `libcuda.so.1` itself.
//!
//! cudarc's NCCL loader cannot be used as is: with `dynamic-loading` it `dlopen`s only the names
//! `libnccl.so`, `libnccl.so.{13,12,11,10,9,1}` and a few Windows-style ones, never `libnccl.so.2` — the only
//! name the `nvidia-nccl-cu13` wheel ships —, keeps the handle in a private `OnceLock` that cannot be pointed
//! elsewhere, and panics when nothing loads. So this module resolves the library path itself and takes the
//! dozen entry points it needs from that library with `libloading`, typed with cudarc's `sys` types. Order:
//! 1. `DDPO_NCCL_LIBRARY` (a path), when set;
//! 2. a `libnccl.so*` already mapped into the process — on GPU machines `libtorch_cuda.so` (linked into every
//!    binary, docs/interfaces.md) has pulled in `libnccl.so.2` through its RPATH, and using that same copy keeps one
//!    NCCL per process;
//! 3. next to the libtorch in use: `<torch>/lib/../../nvidia/nccl/lib/libnccl.so.2` (the PyTorch wheel layout),
//!    `<torch>/lib/libnccl.so.2`;
//! 4. the plain names `libnccl.so.2`, `libnccl.so` through the dynamic loader's search path.
//!
//! [`NcclCollective::available`] is true when that library loads (NCCL ≥ 2.18), the CUDA driver loads and
//! reports at least one device; it never panics. [`NcclCollective::library_path`] says which file was used.
//!
//! # Threads
//! cudarc's safe `Comm` is neither `Send` nor `Sync` (it holds a raw `ncclComm_t`); this type holds the raw
//! communicator itself and is `Send` but not `Sync`: one collective per worker process, used by one thread at
//! a time (every method takes `&mut self`). NCCL allows a communicator to move between threads as long as calls
//! never overlap; each call re-binds the device's primary CUDA context to the calling thread first.
//!
//! # Streams and failures
//! Everything is enqueued on the legacy default (null) stream, the stream tch uses, so NCCL kernels are
//! ordered after the backward pass that produced the gradients and before the optimizer step, with no events.
//! The communicator is created non-blocking; after enqueueing, the calling thread polls the stream and
//! `ncclCommGetAsyncError` until completion. An asynchronous NCCL error, or no completion within the timeout (a
//! dead or hung peer), aborts the communicator and returns an error: the collective is then broken and the job
//! re-forms with a new unique id. NCCL does not say which peer failed, so NCCL errors name none.

use std::ffi::{c_char, c_int, c_void, CStr};
use std::mem::MaybeUninit;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use cudarc::driver::{sys as cu, CudaContext};
use cudarc::nccl::sys::{
    cudaStream_t, ncclComm_t, ncclConfig_t, ncclDataType_t, ncclRedOp_t, ncclUniqueId,
};
use tch::{Device, Kind, Tensor};

use super::{chunk_range, plan_buckets, Collective, CollectiveError, FlatTensors};

/// How long an operation may take before the communicator is aborted, unless set otherwise.
pub const DEFAULT_NCCL_TIMEOUT: Duration = Duration::from_secs(600);

/// Environment variable naming the NCCL shared library to load (overrides the search).
pub const NCCL_LIBRARY_ENV: &str = "DDPO_NCCL_LIBRARY";

const NCCL_SUCCESS: u32 = 0;
const NCCL_IN_PROGRESS: u32 = 7;
/// `NCCL_VERSION(2, 28, 9)`: the header version whose `ncclConfig_t` layout cudarc's `nccl-02028` binds.
const NCCL_CONFIG_VERSION: u32 = 22809;
/// Non-blocking communicators and `ncclConfig_t` as bound here need at least NCCL 2.18.
const NCCL_MIN_VERSION: c_int = 21800;

type Res = u32;

/// The NCCL entry points used here, resolved from the library found by [`nccl_library_candidates`].
struct Api {
    path: PathBuf,
    version: c_int,
    get_error_string: unsafe extern "C" fn(Res) -> *const c_char,
    get_last_error: unsafe extern "C" fn(ncclComm_t) -> *const c_char,
    get_unique_id: unsafe extern "C" fn(*mut ncclUniqueId) -> Res,
    comm_init_rank_config:
        unsafe extern "C" fn(*mut ncclComm_t, c_int, ncclUniqueId, c_int, *mut ncclConfig_t) -> Res,
    comm_get_async_error: unsafe extern "C" fn(ncclComm_t, *mut Res) -> Res,
    comm_abort: unsafe extern "C" fn(ncclComm_t) -> Res,
    group_start: unsafe extern "C" fn() -> Res,
    group_end: unsafe extern "C" fn() -> Res,
    all_reduce: unsafe extern "C" fn(
        *const c_void,
        *mut c_void,
        usize,
        ncclDataType_t,
        ncclRedOp_t,
        ncclComm_t,
        cudaStream_t,
    ) -> Res,
    reduce: unsafe extern "C" fn(
        *const c_void,
        *mut c_void,
        usize,
        ncclDataType_t,
        ncclRedOp_t,
        c_int,
        ncclComm_t,
        cudaStream_t,
    ) -> Res,
    broadcast: unsafe extern "C" fn(
        *const c_void,
        *mut c_void,
        usize,
        ncclDataType_t,
        c_int,
        ncclComm_t,
        cudaStream_t,
    ) -> Res,
    /// Keeps the symbols above valid for the life of the process.
    _lib: libloading::Library,
}

// SAFETY: the struct holds plain function pointers into a library that is never unloaded.
unsafe impl Send for Api {}
unsafe impl Sync for Api {}

/// Paths to try for the NCCL library, in order (see the module documentation).
pub fn nccl_library_candidates() -> Vec<PathBuf> {
    let mut out = Vec::new();
    if let Some(p) = std::env::var_os(NCCL_LIBRARY_ENV) {
        if !p.is_empty() {
            out.push(PathBuf::from(p));
        }
    }
    let mapped: Vec<PathBuf> = std::fs::read_to_string("/proc/self/maps")
        .map(|maps| {
            maps.lines()
                .filter_map(|l| l.split_whitespace().nth(5).map(PathBuf::from))
                .filter(|p| p.is_absolute())
                .collect()
        })
        .unwrap_or_default();
    let name_starts = |p: &Path, s: &str| {
        p.file_name()
            .and_then(|n| n.to_str())
            .is_some_and(|n| n.starts_with(s))
    };
    for p in &mapped {
        if name_starts(p, "libnccl.so") && !out.contains(p) {
            out.push(p.clone());
        }
    }
    for p in &mapped {
        if name_starts(p, "libtorch_cpu.so")
            || name_starts(p, "libtorch_cuda.so")
            || name_starts(p, "libc10.so")
        {
            if let Some(dir) = p.parent() {
                for c in [
                    dir.join("../../nvidia/nccl/lib/libnccl.so.2"),
                    dir.join("libnccl.so.2"),
                ] {
                    if c.exists() && !out.contains(&c) {
                        out.push(c);
                    }
                }
            }
        }
    }
    out.push(PathBuf::from("libnccl.so.2"));
    out.push(PathBuf::from("libnccl.so"));
    out
}

/// Why NCCL cannot be used on this machine; found once per process and kept.
#[derive(Debug, Clone, thiserror::Error)]
pub enum Unavailable {
    #[error(
        "no NCCL library could be loaded (set {NCCL_LIBRARY_ENV} to the path of libnccl.so.2); tried: {}",
        tried.join("; ")
    )]
    NotFound { tried: Vec<String> },
    #[error("NCCL library {} found but unusable: {reason}", path.display())]
    Unusable { path: PathBuf, reason: String },
    #[error("{} is NCCL {version}; at least {NCCL_MIN_VERSION} is needed", path.display())]
    TooOld { path: PathBuf, version: c_int },
    #[error("the CUDA driver library (libcuda.so.1) is not present")]
    NoDriver,
    #[error("the CUDA driver reports no device")]
    NoDevice,
    #[error("the CUDA driver cannot be initialised: {0}")]
    DriverInit(String),
}

fn load_api() -> Result<Api, Unavailable> {
    let mut tried = Vec::new();
    for path in nccl_library_candidates() {
        // SAFETY: loading NCCL runs its (trivial) initialisers; no other code of ours runs concurrently with it.
        let lib = match unsafe { libloading::Library::new(&path) } {
            Ok(lib) => lib,
            Err(e) => {
                tried.push(format!("{}: {e}", path.display()));
                continue;
            }
        };
        return resolve(lib, path);
    }
    Err(Unavailable::NotFound { tried })
}

fn resolve(lib: libloading::Library, path: PathBuf) -> Result<Api, Unavailable> {
    unsafe fn sym<T: Copy>(
        lib: &libloading::Library,
        path: &Path,
        name: &str,
    ) -> Result<T, Unavailable> {
        let mut n = name.as_bytes().to_vec();
        n.push(0);
        lib.get::<T>(n.as_slice())
            .map(|s| *s)
            .map_err(|e| Unavailable::Unusable {
                path: path.to_owned(),
                reason: format!("symbol {name}: {e}"),
            })
    }
    // SAFETY: the function types match NCCL 2.28's nccl.h (enums passed as their u32 representation).
    unsafe {
        let get_version: unsafe extern "C" fn(*mut c_int) -> Res =
            sym(&lib, &path, "ncclGetVersion")?;
        let mut version: c_int = 0;
        if get_version(&mut version) != NCCL_SUCCESS {
            return Err(Unavailable::Unusable {
                path,
                reason: "ncclGetVersion failed".into(),
            });
        }
        if version < NCCL_MIN_VERSION {
            return Err(Unavailable::TooOld { path, version });
        }
        Ok(Api {
            version,
            get_error_string: sym(&lib, &path, "ncclGetErrorString")?,
            get_last_error: sym(&lib, &path, "ncclGetLastError")?,
            get_unique_id: sym(&lib, &path, "ncclGetUniqueId")?,
            comm_init_rank_config: sym(&lib, &path, "ncclCommInitRankConfig")?,
            comm_get_async_error: sym(&lib, &path, "ncclCommGetAsyncError")?,
            comm_abort: sym(&lib, &path, "ncclCommAbort")?,
            group_start: sym(&lib, &path, "ncclGroupStart")?,
            group_end: sym(&lib, &path, "ncclGroupEnd")?,
            all_reduce: sym(&lib, &path, "ncclAllReduce")?,
            reduce: sym(&lib, &path, "ncclReduce")?,
            broadcast: sym(&lib, &path, "ncclBroadcast")?,
            path,
            _lib: lib,
        })
    }
}

fn api() -> Result<&'static Api, CollectiveError> {
    static API: OnceLock<Result<Api, Unavailable>> = OnceLock::new();
    API.get_or_init(load_api)
        .as_ref()
        .map_err(|e| CollectiveError::NcclUnavailable(e.clone()))
}

/// Library, driver and at least one device; computed once.
fn probe() -> Result<&'static Api, CollectiveError> {
    static PROBE: OnceLock<Result<(), Unavailable>> = OnceLock::new();
    let api = api()?;
    PROBE
        .get_or_init(|| {
            // SAFETY: only tries to dlopen the driver library by its usual names.
            if !unsafe { cu::is_culib_present() } {
                return Err(Unavailable::NoDriver);
            }
            match CudaContext::device_count() {
                Ok(n) if n > 0 => Ok(()),
                Ok(_) => Err(Unavailable::NoDevice),
                Err(e) => Err(Unavailable::DriverInit(format!("{e:?}"))),
            }
        })
        .as_ref()
        .map_err(|e| CollectiveError::NcclUnavailable(e.clone()))?;
    Ok(api)
}

fn nccl_config() -> ncclConfig_t {
    const UNDEF: c_int = c_int::MIN; // NCCL_CONFIG_UNDEF_INT
    ncclConfig_t {
        size: std::mem::size_of::<ncclConfig_t>(),
        magic: 0xcafe_beef,
        version: NCCL_CONFIG_VERSION,
        blocking: 0,
        cgaClusterSize: UNDEF,
        minCTAs: UNDEF,
        maxCTAs: UNDEF,
        netName: std::ptr::null(),
        splitShare: UNDEF,
        trafficClass: UNDEF,
        commName: std::ptr::null(),
        collnetEnable: UNDEF,
        CTAPolicy: UNDEF,
        shrinkShare: UNDEF,
        nvlsCTAs: UNDEF,
        nChannelsPerNetPeer: UNDEF,
        nvlinkCentricSched: UNDEF,
    }
}

/// NCCL over the ranks of one job generation, one GPU per rank. See the module documentation.
pub struct NcclCollective {
    rank: usize,
    world: usize,
    device: usize,
    comm: ncclComm_t,
    ctx: Arc<CudaContext>,
    timeout: Duration,
    broken: Option<String>,
}

// SAFETY: the communicator is owned exclusively by this value and only used through `&mut self`, never from
// two threads at once; each call binds the CUDA context to the calling thread. NCCL permits this.
unsafe impl Send for NcclCollective {}

impl std::fmt::Debug for NcclCollective {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NcclCollective")
            .field("rank", &self.rank)
            .field("world", &self.world)
            .field("device", &self.device)
            .field("broken", &self.broken)
            .finish()
    }
}

impl NcclCollective {
    /// True when NCCL, the CUDA driver and a device are present. Never panics; cached after the first call.
    pub fn available() -> bool {
        probe().is_ok()
    }

    /// Why NCCL cannot be used here (`Ok` when it can).
    pub fn check_available() -> Result<(), CollectiveError> {
        probe().map(|_| ())
    }

    /// The NCCL library that was loaded (when one was), and its version code (e.g. 22809).
    pub fn library() -> Option<(PathBuf, i32)> {
        api().ok().map(|a| (a.path.clone(), a.version))
    }

    /// The NCCL library that was loaded, if any.
    pub fn library_path() -> Option<PathBuf> {
        Self::library().map(|(p, _)| p)
    }

    /// A new NCCL unique id: rank 0 creates it, the coordinator relays it to the other ranks.
    pub fn unique_id() -> Result<[u8; 128], CollectiveError> {
        let api = probe()?;
        let mut id = MaybeUninit::<ncclUniqueId>::uninit();
        // SAFETY: NCCL fills the 128-byte id.
        let r = unsafe { (api.get_unique_id)(id.as_mut_ptr()) };
        if r != NCCL_SUCCESS {
            return Err(CollectiveError::Nccl {
                op: "ncclGetUniqueId".into(),
                detail: describe(api, r, None),
            });
        }
        // SAFETY: initialised by the successful call above.
        let id = unsafe { id.assume_init() };
        Ok(id.internal.map(|c| c as u8))
    }

    /// Joins the communicator of `world` ranks identified by `id` as `rank`, on CUDA device `device_index`,
    /// with [`DEFAULT_NCCL_TIMEOUT`].
    pub fn new(
        rank: usize,
        world: usize,
        id: [u8; 128],
        device_index: usize,
    ) -> Result<Self, CollectiveError> {
        Self::with_timeout(rank, world, id, device_index, DEFAULT_NCCL_TIMEOUT)
    }

    /// As [`NcclCollective::new`]; `timeout` bounds the initialisation (every rank must join within it) and
    /// each later operation.
    pub fn with_timeout(
        rank: usize,
        world: usize,
        id: [u8; 128],
        device_index: usize,
        timeout: Duration,
    ) -> Result<Self, CollectiveError> {
        let api = probe()?;
        if world == 0 || rank >= world {
            return Err(CollectiveError::InvalidArgument(format!(
                "rank {rank} out of range for world size {world}"
            )));
        }
        let ctx = CudaContext::new(device_index).map_err(|e| CollectiveError::Nccl {
            op: "init".into(),
            detail: format!("cannot use CUDA device {device_index}: {e:?}"),
        })?;
        let uid = ncclUniqueId {
            internal: id.map(|b| b as c_char),
        };
        let mut config = nccl_config();
        let mut comm: ncclComm_t = std::ptr::null_mut();
        // SAFETY: valid out-pointer and config; the device's context is current on this thread.
        let r = unsafe {
            (api.comm_init_rank_config)(&mut comm, world as c_int, uid, rank as c_int, &mut config)
        };
        if r != NCCL_SUCCESS && r != NCCL_IN_PROGRESS {
            if !comm.is_null() {
                // SAFETY: comm came from the init call.
                unsafe { (api.comm_abort)(comm) };
            }
            return Err(CollectiveError::Nccl {
                op: "ncclCommInitRankConfig".into(),
                detail: describe(api, r, None),
            });
        }
        let mut me = NcclCollective {
            rank,
            world,
            device: device_index,
            comm,
            ctx,
            timeout,
            broken: None,
        };
        me.wait_ready("init")?;
        tracing::info!(
            rank,
            world,
            device = device_index,
            version = api.version,
            "NCCL communicator ready"
        );
        Ok(me)
    }

    pub fn set_timeout(&mut self, timeout: Duration) {
        self.timeout = timeout;
    }

    pub fn device_index(&self) -> usize {
        self.device
    }

    fn fail(&mut self, op: &str, detail: String) -> CollectiveError {
        if !self.comm.is_null() {
            if let Ok(api) = api() {
                // SAFETY: our communicator; aborting unblocks any kernel waiting for peers.
                unsafe { (api.comm_abort)(self.comm) };
            }
            self.comm = std::ptr::null_mut();
        }
        CollectiveError::Nccl {
            op: op.into(),
            detail,
        }
    }

    /// Polls the communicator until a non-blocking call has finished (not `ncclInProgress`).
    fn wait_ready(&mut self, op: &str) -> Result<(), CollectiveError> {
        let api = api()?;
        let start = Instant::now();
        loop {
            let mut st: Res = NCCL_SUCCESS;
            // SAFETY: our live communicator and a valid out-pointer.
            let r = unsafe { (api.comm_get_async_error)(self.comm, &mut st) };
            if r != NCCL_SUCCESS {
                let d = describe(api, r, Some(self.comm));
                return Err(self.fail(op, d));
            }
            match st {
                NCCL_SUCCESS => return Ok(()),
                NCCL_IN_PROGRESS => {}
                e => {
                    let d = describe(api, e, Some(self.comm));
                    return Err(self.fail(op, d));
                }
            }
            if start.elapsed() > self.timeout {
                let d = format!(
                    "not finished after {:?}: a rank is missing, dead or hung",
                    self.timeout
                );
                return Err(self.fail(op, d));
            }
            std::thread::sleep(Duration::from_micros(200));
        }
    }

    /// Checks the return code of an enqueue call.
    fn check(&mut self, op: &str, r: Res) -> Result<(), CollectiveError> {
        match r {
            NCCL_SUCCESS => Ok(()),
            NCCL_IN_PROGRESS => self.wait_ready(op),
            e => {
                let d = describe(api()?, e, Some(self.comm));
                Err(self.fail(op, d))
            }
        }
    }

    /// Waits until everything enqueued on the null stream is done, watching for NCCL errors and the timeout.
    fn wait_stream(&mut self, op: &str) -> Result<(), CollectiveError> {
        let api = api()?;
        let start = Instant::now();
        let mut pause = Duration::from_micros(20);
        loop {
            let mut st: Res = NCCL_SUCCESS;
            // SAFETY: our live communicator and a valid out-pointer.
            unsafe { (api.comm_get_async_error)(self.comm, &mut st) };
            if st != NCCL_SUCCESS && st != NCCL_IN_PROGRESS {
                let d = describe(api, st, Some(self.comm));
                return Err(self.fail(op, d));
            }
            // SAFETY: querying the legacy default stream of the current context.
            match unsafe { cu::cuStreamQuery(std::ptr::null_mut()) } {
                cu::CUresult::CUDA_SUCCESS => return Ok(()),
                cu::CUresult::CUDA_ERROR_NOT_READY => {}
                e => return Err(self.fail(op, format!("CUDA error while waiting: {e:?}"))),
            }
            if start.elapsed() > self.timeout {
                let d = format!(
                    "not finished after {:?}: a rank is dead or hung; communicator aborted",
                    self.timeout
                );
                return Err(self.fail(op, d));
            }
            std::thread::sleep(pause);
            pause = (pause * 2).min(Duration::from_millis(1));
        }
    }

    fn guarded<R>(
        &mut self,
        op: &str,
        f: impl FnOnce(&mut Self) -> Result<R, CollectiveError>,
    ) -> Result<R, CollectiveError> {
        if let Some(why) = &self.broken {
            return Err(CollectiveError::Broken(why.clone()));
        }
        if self.comm.is_null() {
            return Err(CollectiveError::Broken(format!(
                "NCCL communicator aborted before {op}"
            )));
        }
        let r = self
            .ctx
            .bind_to_thread()
            .map_err(|e| CollectiveError::Nccl {
                op: op.into(),
                detail: format!("binding the CUDA context: {e:?}"),
            })
            .and_then(|_| f(self));
        if let Err(e) = &r {
            self.broken = Some(e.to_string());
        }
        r
    }

    fn device(&self) -> Device {
        Device::Cuda(self.device)
    }

    /// In-place sum of a contiguous device tensor (enqueued only).
    fn enqueue_all_reduce(
        &mut self,
        t: &Tensor,
        dtype: ncclDataType_t,
    ) -> Result<(), CollectiveError> {
        let api = api()?;
        let p = t.data_ptr();
        // SAFETY: p is a live contiguous device buffer of t.numel() elements of `dtype` on our device.
        let r = unsafe {
            (api.all_reduce)(
                p,
                p,
                t.numel(),
                dtype,
                ncclRedOp_t::ncclSum,
                self.comm,
                std::ptr::null_mut(),
            )
        };
        self.check("ncclAllReduce", r)
    }

    /// Copies a host slice to the device, runs `f` on the device tensor, waits, copies back.
    fn via_device<T: tch::kind::Element>(
        &mut self,
        op: &str,
        buf: &mut [T],
        f: impl FnOnce(&mut Self, &Tensor) -> Result<(), CollectiveError>,
    ) -> Result<(), CollectiveError> {
        let t = Tensor::f_from_slice(buf)?.f_to_device(self.device())?;
        f(self, &t)?;
        self.wait_stream(op)?;
        t.f_copy_data(buf, buf.len())?;
        Ok(())
    }

    /// One grouped call per rank's chunk (`ncclReduce` to its owner, or `ncclBroadcast` from it), in place.
    fn per_chunk(&mut self, op: &str, t: &Tensor, reduce: bool) -> Result<(), CollectiveError> {
        let api = api()?;
        let len = t.numel();
        let base = t.data_ptr() as *mut f32;
        // SAFETY: group calls bracket the per-chunk calls below.
        let r = unsafe { (api.group_start)() };
        self.check(op, r)?;
        let mut first_err = NCCL_SUCCESS;
        for c in 0..self.world {
            let range = chunk_range(len, self.world, c);
            if range.is_empty() {
                continue;
            }
            // SAFETY: range lies inside t's contiguous f32 device buffer.
            let p = unsafe { base.add(range.start) } as *mut c_void;
            let r = unsafe {
                if reduce {
                    (api.reduce)(
                        p,
                        p,
                        range.len(),
                        ncclDataType_t::ncclFloat32,
                        ncclRedOp_t::ncclSum,
                        c as c_int,
                        self.comm,
                        std::ptr::null_mut(),
                    )
                } else {
                    (api.broadcast)(
                        p,
                        p,
                        range.len(),
                        ncclDataType_t::ncclFloat32,
                        c as c_int,
                        self.comm,
                        std::ptr::null_mut(),
                    )
                }
            };
            if r != NCCL_SUCCESS && r != NCCL_IN_PROGRESS && first_err == NCCL_SUCCESS {
                first_err = r;
            }
        }
        // SAFETY: closes the group opened above.
        let r = unsafe { (api.group_end)() };
        self.check(
            op,
            if first_err != NCCL_SUCCESS {
                first_err
            } else {
                r
            },
        )
    }
}

impl Drop for NcclCollective {
    fn drop(&mut self) {
        if !self.comm.is_null() {
            if let Ok(api) = api() {
                let _ = self.ctx.bind_to_thread();
                // SAFETY: our communicator; every operation was waited for, so nothing is pending. cudarc's Comm
                // also ends with ncclCommAbort.
                unsafe { (api.comm_abort)(self.comm) };
            }
        }
    }
}

fn describe(api: &Api, code: Res, comm: Option<ncclComm_t>) -> String {
    // SAFETY: NCCL returns static NUL-terminated strings (or null).
    let text = |p: *const c_char| {
        if p.is_null() {
            String::new()
        } else {
            unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned()
        }
    };
    let base = text(unsafe { (api.get_error_string)(code) });
    let last = comm
        .map(|c| text(unsafe { (api.get_last_error)(c) }))
        .unwrap_or_default();
    if last.is_empty() {
        format!("{base} (code {code})")
    } else {
        format!("{base} (code {code}): {last}")
    }
}

impl Collective for NcclCollective {
    fn rank(&self) -> usize {
        self.rank
    }

    fn world_size(&self) -> usize {
        self.world
    }

    fn all_reduce_sum_f32(&mut self, buf: &mut [f32]) -> Result<(), CollectiveError> {
        if buf.is_empty() {
            return Ok(());
        }
        self.guarded("all_reduce_sum_f32", |s| {
            s.via_device("all_reduce_sum_f32", buf, |s, t| {
                s.enqueue_all_reduce(t, ncclDataType_t::ncclFloat32)
            })
        })
    }

    fn all_reduce_sum_f64(&mut self, buf: &mut [f64]) -> Result<(), CollectiveError> {
        if buf.is_empty() {
            return Ok(());
        }
        self.guarded("all_reduce_sum_f64", |s| {
            s.via_device("all_reduce_sum_f64", buf, |s, t| {
                s.enqueue_all_reduce(t, ncclDataType_t::ncclFloat64)
            })
        })
    }

    /// On the device: per bucket, gather the pieces into one f32 device buffer, `ncclAllReduce` (sum), divide
    /// by the world size, copy back; all on the null stream, then one wait for the whole call.
    fn all_reduce_mean_tensors(
        &mut self,
        tensors: &[Tensor],
        bucket_bytes: usize,
    ) -> Result<(), CollectiveError> {
        if tensors.is_empty() {
            return Ok(());
        }
        let device = self.device();
        for (i, t) in tensors.iter().enumerate() {
            if t.device() != device {
                return Err(CollectiveError::InvalidArgument(format!(
                    "tensor {i} is on {:?}; the NCCL collective of this rank works on {device:?}",
                    t.device()
                )));
            }
        }
        let world = self.world as f64;
        self.guarded("all_reduce_mean_tensors", |s| {
            tch::no_grad(|| {
                let flats = FlatTensors::new(tensors)?;
                for bucket in plan_buckets(&flats.numels(), bucket_bytes) {
                    let parts = bucket
                        .pieces
                        .iter()
                        .map(|p| Ok(flats.piece(p)?.f_to_kind(Kind::Float)?))
                        .collect::<Result<Vec<_>, CollectiveError>>()?;
                    let mut buf = Tensor::f_cat(&parts, 0)?;
                    s.enqueue_all_reduce(&buf, ncclDataType_t::ncclFloat32)?;
                    let _ = buf.f_div_scalar_(world)?;
                    for p in &bucket.pieces {
                        let mut dst = flats.piece(p)?;
                        dst.f_copy_(&buf.f_narrow(0, p.offset as i64, p.range.len() as i64)?)?;
                    }
                }
                s.wait_stream("all_reduce_mean_tensors")?;
                flats.finish()
            })
        })
    }

    fn broadcast_bytes(&mut self, buf: &mut Vec<u8>, root: usize) -> Result<(), CollectiveError> {
        if root >= self.world {
            return Err(CollectiveError::InvalidArgument(format!(
                "broadcast root {root} out of 0..{}",
                self.world
            )));
        }
        self.guarded("broadcast_bytes", |s| {
            let api = api()?;
            let bcast = |s: &mut Self, t: &Tensor| {
                let p = t.data_ptr();
                // SAFETY: p is a live contiguous u8 device buffer of t.numel() bytes.
                let r = unsafe {
                    (api.broadcast)(
                        p,
                        p,
                        t.numel(),
                        ncclDataType_t::ncclUint8,
                        root as c_int,
                        s.comm,
                        std::ptr::null_mut(),
                    )
                };
                s.check("ncclBroadcast", r)
            };
            let mut len = (buf.len() as u64).to_le_bytes();
            s.via_device("broadcast_bytes", &mut len[..], bcast)?;
            let n = u64::from_le_bytes(len) as usize;
            if s.rank != root {
                buf.clear();
                buf.resize(n, 0);
            }
            if n > 0 {
                s.via_device("broadcast_bytes", &mut buf[..], bcast)?;
            }
            Ok(())
        })
    }

    fn barrier(&mut self) -> Result<(), CollectiveError> {
        let mut one = [1f32];
        self.all_reduce_sum_f32(&mut one)
    }

    /// Exact chunk boundaries ([`chunk_range`], which may be uneven) through one grouped `ncclReduce` per chunk.
    fn reduce_scatter_sum_f32(&mut self, buf: &mut [f32]) -> Result<Range<usize>, CollectiveError> {
        let mine = chunk_range(buf.len(), self.world, self.rank);
        if buf.is_empty() {
            return Ok(mine);
        }
        self.guarded("reduce_scatter_sum_f32", |s| {
            s.via_device("reduce_scatter_sum_f32", buf, |s, t| {
                s.per_chunk("reduce_scatter_sum_f32", t, true)
            })
        })?;
        Ok(mine)
    }

    /// One grouped `ncclBroadcast` per chunk from its owner: exact bytes everywhere.
    fn all_gather_f32(&mut self, buf: &mut [f32]) -> Result<(), CollectiveError> {
        if buf.is_empty() {
            return Ok(());
        }
        self.guarded("all_gather_f32", |s| {
            s.via_device("all_gather_f32", buf, |s, t| {
                s.per_chunk("all_gather_f32", t, false)
            })
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn candidates_end_with_plain_names() {
        let c = nccl_library_candidates();
        assert_eq!(c[c.len() - 2], PathBuf::from("libnccl.so.2"));
        assert_eq!(c[c.len() - 1], PathBuf::from("libnccl.so"));
    }

    #[test]
    fn config_layout_is_nccl_2_28() {
        let c = nccl_config();
        assert_eq!(c.size, std::mem::size_of::<ncclConfig_t>());
        assert_eq!(c.blocking, 0);
        assert_eq!(c.magic, 0xcafebeef);
    }
}
