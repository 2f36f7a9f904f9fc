//! gRPC wire types (package `ddpo.v1`), generated from `proto/`. Wire types stay at this edge.

#[allow(clippy::all, missing_docs)]
pub mod pb {
    tonic::include_proto!("ddpo.v1");
    /// Encoded file descriptor set, for server reflection.
    pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("ddpo_descriptor");
}

/// The short lower-case names the status table, the JSON status and the logs use (`PHASE_DONE` → `done`).
fn short(name: &str, prefix: &str) -> String {
    name.strip_prefix(prefix)
        .unwrap_or(name)
        .to_ascii_lowercase()
}

impl pb::Phase {
    pub fn name(self) -> String {
        short(self.as_str_name(), "PHASE_")
    }
}

impl pb::WorkerState {
    pub fn name(self) -> String {
        short(self.as_str_name(), "WORKER_STATE_")
    }
}

impl pb::Backend {
    pub fn name(self) -> String {
        short(self.as_str_name(), "BACKEND_")
    }
}

#[cfg(test)]
mod tests {
    use super::pb;

    #[test]
    fn short_names_are_the_status_words() {
        assert_eq!(pb::Phase::Done.name(), "done");
        assert_eq!(pb::Phase::Precompute.name(), "precompute");
        assert_eq!(pb::WorkerState::Precomputing.name(), "precomputing");
        assert_eq!(pb::Backend::Nccl.name(), "nccl");
    }
}
