//! Output operations: `foreach_batch`, `print`, and the Parquet sink.
//!
//! An output operation computes its stream for the batch and hands the result on. Outputs run
//! one after another, in the order they were registered, on the job thread; their stages run in
//! parallel on the pool. Delivery: the Parquet sink is idempotent per batch time (a re-run
//! replaces the batch's files), so its output is exactly-once; `foreach_batch` with arbitrary side
//! effects is at-least-once (a batch interrupted by a crash runs again).

use std::sync::Arc;

use super::dstream::DStream;
use crate::exec::{BatchEnv, Data, InputReads, InstanceId, JobError, Node};
use crate::{BatchTime, BoxError};

/// A registered output operation.
pub(crate) trait OutputOp: Send + Sync {
    /// Computes and delivers the batch.
    ///
    /// # Errors
    /// A stage failure (policy: stop) or a sink error.
    fn run(&self, env: &BatchEnv) -> Result<(), OutputError>;
    /// Drops the caches of `instance` for batches up to `time_ms`.
    fn forget(&self, instance: InstanceId, time_ms: i64);
    /// Counts the input reads of a batch of this output ([`Node::input_reads`]).
    fn input_reads(&self, reads: &mut InputReads);
}

/// Why an output operation failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum OutputError {
    /// A task failed and the failure policy says stop.
    #[error(transparent)]
    Job(#[from] JobError),
    /// The user's output function or a sink returned an error.
    #[error("output of batch {time} failed: {source}")]
    Sink {
        /// Batch time.
        time: BatchTime,
        /// What failed.
        source: BoxError,
    },
}

struct ForeachBatch<T> {
    node: Arc<dyn Node<T>>,
    f: Arc<dyn Fn(BatchTime, Vec<T>) -> Result<(), BoxError> + Send + Sync>,
}

impl<T: Data> OutputOp for ForeachBatch<T> {
    fn run(&self, env: &BatchEnv) -> Result<(), OutputError> {
        if !self.node.active(env) {
            // Still run the stages below so windows see every batch.
            self.node.prepare(env)?;
            return Ok(());
        }
        // The user's function runs as a task of the runner: a panic is retried with the batch's
        // elements computed again (the function took them by value).
        let delivered = env.runner.run_task(env, &|| {
            let items: Vec<T> = env.runner.collect(env, &*self.node)?.into_iter().flatten().collect();
            Ok((self.f)(BatchTime::from_millis(env.time_ms), items))
        })?;
        delivered.map_err(|source| OutputError::Sink {
            time: BatchTime::from_millis(env.time_ms),
            source,
        })
    }
    fn forget(&self, instance: InstanceId, time_ms: i64) {
        self.node.forget(instance, time_ms);
    }

    fn input_reads(&self, reads: &mut InputReads) {
        self.node.input_reads(reads);
    }
}

impl<T: Data> DStream<T> {
    /// Runs `f` with the batch time and every element of the batch (in partition order), as a
    /// task on the executor pool; outputs run one after another, in the order they were defined.
    ///
    /// At-least-once: after a crash, a batch that had not completed runs again with the same
    /// elements; a panic in `f` is retried the same way (with the elements computed again), up to
    /// `max_task_attempts`. An `Err` from `f` stops the stream (the batch is not marked complete)
    /// with [`Error::Output`](crate::Error::Output).
    ///
    /// # Errors
    /// [`Error::Started`](crate::Error::Started) once the context is started.
    ///
    /// ```
    /// # use std::sync::{Arc, Mutex};
    /// # use sluice_engine::BatchTime;
    /// # use sluice_engine::testing::TestHarness;
    /// # fn text(b: bytes::Bytes) -> String { String::from_utf8_lossy(&b).into_owned() }
    /// # let h = TestHarness::new()?;
    /// let lines = h.input()?.map(text);
    /// let seen: Arc<Mutex<Vec<(BatchTime, Vec<String>)>>> = Arc::default();
    /// let keep = seen.clone();
    /// lines.foreach_batch(move |batch_time, lines| {
    ///     keep.lock().unwrap().push((batch_time, lines));
    ///     Ok(())
    /// })?;
    /// h.start()?;
    /// h.push(["a", "b"]);
    /// let batch = h.run_batch()?;
    /// assert_eq!(*seen.lock().unwrap(), vec![(batch.batch_time, vec!["a".to_owned(), "b".to_owned()])]);
    /// # Ok::<(), sluice_engine::Error>(())
    /// ```
    pub fn foreach_batch(
        &self,
        f: impl Fn(BatchTime, Vec<T>) -> Result<(), BoxError> + Send + Sync + 'static,
    ) -> crate::Result<()> {
        self.graph.add_output(Box::new(ForeachBatch {
            node: self.node.clone(),
            f: Arc::new(f),
        }))
    }
}

impl<T: Data + std::fmt::Debug> DStream<T> {
    /// Prints the first `n` elements of every batch, as Spark's `print` does.
    ///
    /// # Errors
    /// [`Error::Started`](crate::Error::Started) once the context is started.
    ///
    /// ```
    /// # use sluice_engine::testing::TestHarness;
    /// # fn text(b: bytes::Bytes) -> String { String::from_utf8_lossy(&b).into_owned() }
    /// # let h = TestHarness::new()?;
    /// let lines = h.input()?.map(text);
    /// lines.print(10)?; // "Time: <batch time> ms", then the first 10 lines of every batch
    /// h.start()?;
    /// h.push(["a", "b"]);
    /// h.run_batch()?;
    /// # Ok::<(), sluice_engine::Error>(())
    /// ```
    pub fn print(&self, n: usize) -> crate::Result<()> {
        self.foreach_batch(move |time, items| {
            println!(
                "-------------------------------------------\nTime: {time}\n-------------------------------------------"
            );
            for item in items.iter().take(n) {
                println!("{item:?}");
            }
            if items.len() > n {
                println!("...");
            }
            println!();
            Ok(())
        })
    }
}

struct SaveParquet<T> {
    node: Arc<dyn Node<T>>,
    sink: sluice_operators::ParquetSink,
    location: String,
}

impl<T: Data + sluice_operators::ToRecordBatch> OutputOp for SaveParquet<T> {
    fn run(&self, env: &BatchEnv) -> Result<(), OutputError> {
        let sink_error = |e: sluice_operators::Error| OutputError::Sink {
            time: BatchTime::from_millis(env.time_ms),
            source: format!("Parquet sink {}: {e}", self.location).into(),
        };
        if !self.node.active(env) {
            self.node.prepare(env)?;
            return Ok(());
        }
        let parts = env.runner.collect(env, &*self.node)?;
        let batches = parts
            .iter()
            .filter(|p| !p.is_empty())
            .map(|p| T::to_record_batch(p).map_err(sink_error))
            .collect::<Result<Vec<_>, _>>()?;
        self.sink
            .write_batch(env.time_ms, &env.writer, batches)
            .map_err(sink_error)
    }
    fn forget(&self, instance: InstanceId, time_ms: i64) {
        self.node.forget(instance, time_ms);
    }

    fn input_reads(&self, reads: &mut InputReads) {
        self.node.input_reads(reads);
    }
}

impl<T: Data + sluice_operators::ToRecordBatch> DStream<T> {
    /// Writes every batch as Parquet under `location` (a local directory or an object-store URL
    /// such as `s3://bucket/prefix`): one directory `batch_time=<ms>` per batch, in it one file
    /// per partition named by this worker (`part-<worker id>-<i>.parquet`) and its
    /// `_SUCCESS-<worker id>` marker written last. Re-running a batch replaces this worker's
    /// files of it, so the output is exactly-once — also when several workers of the
    /// application write to one location (`docs/operators.md` shows how to read it).
    ///
    /// # Errors
    /// [`crate::Error::Sink`] if the location cannot be opened; [`crate::Error::Started`] once the
    /// context is started.
    ///
    /// ```
    /// # use sluice_engine::testing::TestHarness;
    /// # fn text(b: bytes::Bytes) -> String { String::from_utf8_lossy(&b).into_owned() }
    /// # let h = TestHarness::new()?;
    /// let out = h.context().data_dir().join("counts").display().to_string();
    /// let words = h.input()?.map(text);
    /// words.count_by_value().save_parquet(&out)?;
    /// h.start()?;
    /// h.push(["a", "b", "a"]);
    /// let batch = h.run_batch()?;
    /// let committed = sluice_operators::ParquetSink::read_committed(&out).expect("readable");
    /// assert_eq!(committed[0].0, batch.batch_time.as_millis());
    /// assert_eq!(committed.iter().map(|(_, rows)| rows.num_rows()).sum::<usize>(), 2);
    /// # Ok::<(), sluice_engine::Error>(())
    /// ```
    pub fn save_parquet(&self, location: &str) -> crate::Result<()> {
        let sink = sluice_operators::ParquetSink::open(location).map_err(|e| crate::Error::Sink {
            location: location.to_owned(),
            message: e.to_string(),
        })?;
        self.graph.add_output(Box::new(SaveParquet {
            node: self.node.clone(),
            sink,
            location: location.to_owned(),
        }))
    }
}
