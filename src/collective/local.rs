//! World size 1: every collective is the identity.

use std::ops::Range;

use tch::Tensor;

use super::{Collective, CollectiveError};

/// The collective of a job with one rank: sums, means, broadcasts and barriers leave the data as it is.
#[derive(Debug, Default, Clone, Copy)]
pub struct LocalCollective;

impl Collective for LocalCollective {
    fn rank(&self) -> usize {
        0
    }

    fn world_size(&self) -> usize {
        1
    }

    fn all_reduce_sum_f32(&mut self, _buf: &mut [f32]) -> Result<(), CollectiveError> {
        Ok(())
    }

    fn all_reduce_sum_f64(&mut self, _buf: &mut [f64]) -> Result<(), CollectiveError> {
        Ok(())
    }

    fn all_reduce_mean_tensors(
        &mut self,
        _tensors: &[Tensor],
        _bucket_bytes: usize,
    ) -> Result<(), CollectiveError> {
        Ok(())
    }

    fn broadcast_bytes(&mut self, _buf: &mut Vec<u8>, root: usize) -> Result<(), CollectiveError> {
        if root != 0 {
            return Err(CollectiveError::InvalidArgument(format!(
                "broadcast root {root} with world size 1"
            )));
        }
        Ok(())
    }

    fn barrier(&mut self) -> Result<(), CollectiveError> {
        Ok(())
    }

    fn reduce_scatter_sum_f32(&mut self, buf: &mut [f32]) -> Result<Range<usize>, CollectiveError> {
        Ok(0..buf.len())
    }

    fn all_gather_f32(&mut self, _buf: &mut [f32]) -> Result<(), CollectiveError> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn local_is_identity() {
        let mut c = LocalCollective;
        let mut a = vec![1.5f32, -2.0, 3.25];
        c.all_reduce_sum_f32(&mut a).unwrap();
        assert_eq!(a, vec![1.5, -2.0, 3.25]);
        let mut d = vec![1.0f64; 3];
        c.all_reduce_sum_f64(&mut d).unwrap();
        assert_eq!(d, vec![1.0; 3]);
        assert_eq!(c.reduce_scatter_sum_f32(&mut a).unwrap(), 0..3);
        c.all_gather_f32(&mut a).unwrap();
        let mut b = b"abc".to_vec();
        c.broadcast_bytes(&mut b, 0).unwrap();
        assert_eq!(b, b"abc");
        assert!(c.broadcast_bytes(&mut b, 1).is_err());
        c.barrier().unwrap();
        let t = Tensor::from_slice(&[2.0f32, 4.0]);
        c.all_reduce_mean_tensors(&[t.shallow_clone()], 4).unwrap();
        assert_eq!(Vec::<f32>::try_from(&t).unwrap(), vec![2.0, 4.0]);
        assert_eq!((c.rank(), c.world_size()), (0, 1));
    }
}
