//! The input node: one partition per block of the batch, the records' payloads as zero-copy
//! slices of the block.

use std::sync::Arc;

use bytes::Bytes;

use crate::exec::{BatchEnv, InputReads, InstanceId, JobError, Node, Scope, TaskError, TrackedBlock};

/// Reads the payloads of an input's blocks: one partition per block.
pub(crate) struct PayloadInputNode {
    pub input_id: u32,
}

/// Owns a block's payload buffer so that each record can be a zero-copy `Bytes` slice of it.
struct ArrowBytes(arrow_buffer::Buffer);

impl AsRef<[u8]> for ArrowBytes {
    fn as_ref(&self) -> &[u8] {
        self.0.as_slice()
    }
}

impl Node<Bytes> for PayloadInputNode {
    fn num_partitions(&self, env: &BatchEnv) -> usize {
        env.inputs.get(&self.input_id).map_or(0, Vec::len)
    }

    fn prepare(&self, _env: &BatchEnv) -> Result<(), JobError> {
        Ok(())
    }

    fn compute(
        &self,
        env: &BatchEnv,
        scope: Scope<'_>,
        p: usize,
        emit: &mut dyn FnMut(Bytes),
    ) -> Result<(), TaskError> {
        let Some(tracked) = env.inputs.get(&self.input_id).and_then(|b| b.get(p)) else {
            return Ok(());
        };
        let read;
        let block = if let Some(block) = scope.block {
            debug_assert_eq!(block.id(), tracked.meta.id, "isolation passes the partition's block");
            block
        } else {
            read = Arc::new(env.blocks.read(tracked)?);
            &read
        };
        let data = block.data();
        let offsets = data.value_offsets();
        let values = Bytes::from_owner(ArrowBytes(data.values().clone()));
        let range = match scope.only_record {
            Some(i) => i..(i + 1).min(block.len()),
            None => 0..block.len(),
        };
        match scope.cursor {
            Some(cursor) => {
                cursor.enter(block);
                for i in range {
                    cursor.set(i);
                    emit(values.slice(offsets[i] as usize..offsets[i + 1] as usize));
                }
                cursor.leave();
            }
            None => {
                for i in range {
                    emit(values.slice(offsets[i] as usize..offsets[i + 1] as usize));
                }
            }
        }
        Ok(())
    }

    fn source_block(&self, env: &BatchEnv, p: usize) -> Option<TrackedBlock> {
        env.inputs.get(&self.input_id).and_then(|b| b.get(p)).cloned()
    }

    fn input_reads(&self, reads: &mut InputReads) {
        reads.input(self.input_id);
    }

    fn forget(&self, _instance: InstanceId, _time_ms: i64) {}
}
