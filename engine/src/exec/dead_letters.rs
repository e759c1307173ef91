//! Dead letters: the input records a batch could not process, collected once per batch.
//!
//! A record reaches the dead-letter sink in two ways (under [`FailurePolicy::DeadLetter`]):
//!
//! - a **fallible operator** (`try_map`, `try_flat_map`, `try_filter`) returned `Err` for it —
//!   the error is a value, the record is attributed through the [`RecordCursor`] the input node
//!   keeps up to date, and nothing is re-run;
//! - a **panic** (a bug) kept failing its task: the task's block is read once and its records
//!   are evaluated one at a time, and the ones that still panic are dead-lettered.
//!
//! Either way the letter goes to the [`DeadLetterCollector`] of the batch being computed. It
//! keeps one letter per input record — a record re-evaluated by a retry, by isolation, or by a
//! second stage reading the same chain is one letter — so a batch writes each bad record once,
//! and the metrics count records, not evaluations. A batch recomputed for a window (after a
//! restart) collects into its own environment, which is dropped: its letters were written when
//! that batch ran.
//!
//! [`FailurePolicy::DeadLetter`]: crate::FailurePolicy::DeadLetter

use std::cell::{Cell, RefCell};
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use sluice_blockstore::{Block, Position, Record};

use super::node::BatchEnv;
use super::runner::{DeadLetter, FailurePolicy, TaskError};
use crate::BoxError;

/// Where a fallible operator's `Err` for the current record goes: under
/// [`FailurePolicy::DeadLetter`] into the batch's dead letters, attributed to the input record the
/// cursor points at; under [`FailurePolicy::Stop`] — or when no single input record produced the
/// element (after a shuffle, a window, a whole-batch function) — a [`TaskError::Rejected`] that
/// stops the stream.
pub(crate) fn reject(
    env: &BatchEnv,
    stage: &Arc<str>,
    cursor: Option<&RecordCursor>,
    error: &BoxError,
) -> Result<(), TaskError> {
    let error = error_text(&**error);
    let record = cursor.and_then(RecordCursor::record);
    match (env.runner.policy, record) {
        (FailurePolicy::DeadLetter, Some((input_id, record))) => {
            env.dead_letters.add(
                input_id,
                DeadLetter {
                    batch_time: env.batch_time(),
                    record,
                    error,
                    attempts: 1,
                    stage: stage.clone(),
                },
            );
            Ok(())
        }
        (_, record) => Err(TaskError::Rejected {
            stage: stage.to_string(),
            record: record.map_or_else(
                || {
                    "an element with no single input record (after a shuffle, a window or a whole-batch function)"
                        .to_owned()
                },
                |(_, r)| format!("record {} of shard {}", r.position, r.shard_id),
            ),
            error,
        }),
    }
}

/// An error's display text followed by its sources' (`outer: inner: root`).
fn error_text(error: &(dyn std::error::Error + 'static)) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(e) = source {
        text.push_str(": ");
        text.push_str(&e.to_string());
        source = e.source();
    }
    text
}

/// The input record a fused chain is processing: the input node sets it before it emits each
/// record's payload; fallible operators above read it to dead-letter that record. One per task
/// attempt, on that task's thread.
#[derive(Default)]
pub(crate) struct RecordCursor {
    block: RefCell<Option<Arc<Block>>>,
    index: Cell<usize>,
}

impl RecordCursor {
    /// The block the next records come from (once per partition).
    pub(crate) fn enter(&self, block: &Arc<Block>) {
        *self.block.borrow_mut() = Some(block.clone());
    }

    /// The record about to be emitted.
    pub(crate) fn set(&self, index: usize) {
        self.index.set(index);
    }

    /// The block being emitted and the index of the current record in it; `None` outside a
    /// block-backed chain.
    pub(crate) fn current(&self) -> Option<(Arc<Block>, usize)> {
        let block = self.block.borrow();
        block.as_ref().map(|b| (b.clone(), self.index.get()))
    }

    /// The index of the current record in its block; `None` outside a block-backed chain.
    pub(crate) fn index(&self) -> Option<usize> {
        self.block.borrow().as_ref().map(|_| self.index.get())
    }

    /// The current input record, rebuilt from its block; `None` outside a block-backed chain
    /// (after a shuffle, a window, a whole-batch function).
    pub(crate) fn record(&self) -> Option<(u32, Record)> {
        let block = self.block.borrow();
        let block = block.as_ref()?;
        let record = block.record(self.index.get()).ok()?;
        Some((block.id().input_id, record))
    }

    /// Leaves the block (elements emitted from here on have no input record).
    pub(crate) fn leave(&self) {
        *self.block.borrow_mut() = None;
    }
}

/// One input record: `(input, shard, position)`.
type LetterKey = (u32, Arc<str>, Position);

/// The dead letters of one batch, one per input record; see the [module docs](self).
#[derive(Debug, Default)]
pub(crate) struct DeadLetterCollector {
    letters: Mutex<BTreeMap<LetterKey, DeadLetter>>,
}

impl DeadLetterCollector {
    /// Records `letter` for the record of input `input_id` unless that record already has one
    /// (when two stages reject it, the letter of the stage first by name stays: deterministic).
    pub(crate) fn add(&self, input_id: u32, letter: DeadLetter) {
        let key = (input_id, letter.record.shard_id.clone(), letter.record.position.clone());
        let mut letters = self.letters.lock().expect("dead letters");
        match letters.get(&key) {
            Some(kept) if kept.stage <= letter.stage => {}
            _ => {
                letters.insert(key, letter);
            }
        }
    }

    /// The batch's letters, in input, shard and position order; leaves the collector empty.
    pub(crate) fn take(&self) -> Vec<DeadLetter> {
        std::mem::take(&mut *self.letters.lock().expect("dead letters"))
            .into_values()
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use sluice_blockstore::{Bytes, Position, Record, SequenceNumber};

    use super::DeadLetterCollector;
    use crate::exec::DeadLetter;

    fn letter(seq: u128, stage: &str) -> DeadLetter {
        DeadLetter {
            batch_time: crate::BatchTime::from_millis(1_000),
            record: Record {
                shard_id: Arc::from("shardId-000000000000"),
                position: Position::plain(SequenceNumber::from_u128(seq)),
                partition_key: Arc::from("pk"),
                approximate_arrival_ms: 0,
                data: Bytes::from_static(b"bad"),
            },
            error: format!("rejected by {stage}"),
            attempts: 1,
            stage: Arc::from(stage),
        }
    }

    #[test]
    fn one_letter_per_record_whichever_stage_meets_it_first() {
        let letters = DeadLetterCollector::default();
        letters.add(0, letter(7, "try_map#2"));
        letters.add(0, letter(7, "try_map#2")); // a retry, or a second stage over the same chain
        letters.add(0, letter(7, "try_map#1")); // an earlier-named stage wins, in any order
        letters.add(0, letter(5, "panic"));
        letters.add(1, letter(5, "panic")); // the same position in another input is another record
        let taken = letters.take();
        let got: Vec<(u128, &str)> = taken
            .iter()
            .map(|l| (l.record.position.sequence.to_u128().unwrap(), &*l.stage))
            .collect();
        assert_eq!(got, vec![(5, "panic"), (7, "try_map#1"), (5, "panic")]);
        assert!(letters.take().is_empty(), "taking empties the collector");
    }
}
