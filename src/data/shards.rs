//! Shard discovery: data paths or globs from the config, expanded to a sorted, de-duplicated list of files.
//!
//! Invariant: the order is deterministic (sorted by path), so every process of a job sees the same shard list.

use std::path::PathBuf;

use super::DataError;

/// Expands each pattern; a pattern that matches nothing is an error naming it (a typo in a path must not
/// silently train on less data).
pub fn discover(patterns: &[String]) -> Result<Vec<PathBuf>, DataError> {
    let mut out = Vec::new();
    for pat in patterns {
        let is_glob = pat.contains(['*', '?', '[']);
        if !is_glob {
            let p = PathBuf::from(pat);
            if !p.is_file() {
                return Err(DataError::NoShards {
                    pattern: pat.clone(),
                    reason: "no such file".into(),
                });
            }
            out.push(p);
            continue;
        }
        let paths = glob::glob(pat).map_err(|e| DataError::NoShards {
            pattern: pat.clone(),
            reason: format!("bad glob: {e}"),
        })?;
        let mut found = 0;
        for p in paths {
            let p = p.map_err(|e| DataError::NoShards {
                pattern: pat.clone(),
                reason: e.to_string(),
            })?;
            if p.is_file() {
                out.push(p);
                found += 1;
            }
        }
        if found == 0 {
            return Err(DataError::NoShards {
                pattern: pat.clone(),
                reason: "the glob matches no file".into(),
            });
        }
    }
    out.sort();
    out.dedup();
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn globs_sort_and_dedup_and_name_missing_patterns() {
        let dir = tempfile::tempdir().unwrap();
        for n in ["b.parquet", "a.parquet", "c.txt"] {
            std::fs::write(dir.path().join(n), b"x").unwrap();
        }
        let d = dir.path().display();
        let got = discover(&[format!("{d}/*.parquet"), format!("{d}/a.parquet")]).unwrap();
        assert_eq!(
            got,
            vec![dir.path().join("a.parquet"), dir.path().join("b.parquet")]
        );
        let e = discover(&[format!("{d}/*.json")]).unwrap_err().to_string();
        assert!(e.contains("*.json") && e.contains("matches no file"), "{e}");
        let e = discover(&[format!("{d}/zz.parquet")])
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("zz.parquet") && e.contains("no such file"),
            "{e}"
        );
    }
}
