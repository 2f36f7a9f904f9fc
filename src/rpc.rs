//! gRPC wire types (package `ddpo.v1`), generated from `proto/`. Wire types stay at this edge.

#[allow(clippy::all, missing_docs)]
pub mod pb {
    tonic::include_proto!("ddpo.v1");
    /// Encoded file descriptor set, for server reflection.
    pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("ddpo_descriptor");
}
