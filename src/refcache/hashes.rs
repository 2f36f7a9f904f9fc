//! Content hashes of big files, memoised by (path, size, mtime), and the small file helpers the cache uses.

use super::*;

/// Writes `bytes` to `path` through a temporary sibling and a rename ([`fsx::write_atomic`]).
pub(super) fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), CacheError> {
    fsx::write_atomic(path, bytes).map_err(io_err(path))
}

pub(super) fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// sha256 of a file's contents.
pub fn sha256_file(path: &Path) -> Result<String, CacheError> {
    let mut f = File::open(path).map_err(io_err(path))?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf).map_err(io_err(path))?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(hex(&h.finalize()))
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub(super) struct MemoEntry {
    pub(super) size: u64,
    pub(super) mtime_ns: u128,
    pub(super) sha256: String,
}

#[derive(Debug, Default, Serialize, Deserialize)]
pub(super) struct MemoFile {
    pub(super) files: BTreeMap<String, MemoEntry>,
}

/// Content hashes of big files by (absolute path, size, mtime), kept in `<cache root>/file-hashes.json`.
/// Only a memo: unreadable means empty, a failed save means hashing again next time.
#[derive(Debug)]
pub(super) struct HashMemo {
    pub(super) path: PathBuf,
    pub(super) memo: MemoFile,
    pub(super) dirty: bool,
    pub(super) min_bytes: u64,
}

impl HashMemo {
    pub(super) fn load(root: &Path) -> Self {
        let path = root.join(HASH_MEMO);
        let memo = fs::read_to_string(&path)
            .ok()
            .and_then(|t| serde_json::from_str(&t).ok())
            .unwrap_or_default();
        Self {
            path,
            memo,
            dirty: false,
            min_bytes: MEMO_MIN_BYTES,
        }
    }

    pub(super) fn hash(&mut self, file: &Path) -> Result<String, CacheError> {
        let meta = fs::metadata(file).map_err(io_err(file))?;
        if meta.len() < self.min_bytes {
            return sha256_file(file);
        }
        let mtime_ns = meta
            .modified()
            .ok()
            .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        let key = absolute(file).to_string_lossy().into_owned();
        if let Some(e) = self.memo.files.get(&key) {
            if e.size == meta.len() && e.mtime_ns == mtime_ns && mtime_ns != 0 {
                return Ok(e.sha256.clone());
            }
        }
        let sha256 = sha256_file(file)?;
        self.memo.files.insert(
            key,
            MemoEntry {
                size: meta.len(),
                mtime_ns,
                sha256: sha256.clone(),
            },
        );
        self.dirty = true;
        Ok(sha256)
    }

    /// Merges with what is on disk now (another process may have added entries) and writes atomically.
    pub(super) fn save(&mut self) {
        if !self.dirty {
            return;
        }
        let on_disk: MemoFile = fs::read_to_string(&self.path)
            .ok()
            .and_then(|t| serde_json::from_str(&t).ok())
            .unwrap_or_default();
        for (k, v) in on_disk.files {
            self.memo.files.entry(k).or_insert(v);
        }
        // Forget files that no longer exist, so the memo does not grow forever.
        self.memo.files.retain(|k, _| Path::new(k).exists());
        let bytes = serde_json::to_vec_pretty(&self.memo).expect("plain data serialises");
        match write_atomic(&self.path, &bytes) {
            Ok(()) => self.dirty = false,
            Err(e) => tracing::warn!("cannot save the hash memo: {e}"),
        }
    }
}

/// Now as RFC 3339 UTC (`2025-01-31T12:34:56Z`).
pub(super) fn rfc3339_now() -> String {
    let secs = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    rfc3339(secs)
}

pub(super) fn rfc3339(secs: u64) -> String {
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    // Howard Hinnant's civil_from_days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}
