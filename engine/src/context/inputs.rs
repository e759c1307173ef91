//! The context's input streams: a receiver over any [`Source`], the embedded local log, and
//! Kinesis (feature `kinesis`).

use std::path::Path;
use std::sync::Arc;

use bytes::Bytes;
use sluice_receiver::local_log::LocalLog;
use sluice_receiver::{LeaseStore, LocalLeaseStore, ReceiverConfig, Source};

use crate::plan::dstream::DStream;
use crate::plan::input_node::PayloadInputNode;
use crate::runtime::ingest::InputSpec;
use crate::{Error, Result, StreamingContext};

impl StreamingContext {
    /// A stream of record payloads read from `source` by a receiver.
    ///
    /// The receiver reads every shard (children after their parents), cuts blocks every
    /// `config.block_interval_ms`, and checkpoints shard positions in a local lease file under
    /// `<data_dir>/leases/` only after the blocks covering them are stored and logged. Each batch
    /// has one partition per block; payloads are zero-copy slices of the block.
    ///
    /// # Errors
    /// [`Error::Config`] if the receiver configuration is invalid.
    pub fn source_stream(&self, source: Arc<dyn Source>, config: ReceiverConfig) -> Result<DStream<Bytes>> {
        self.receiver_stream(source, None, config)
    }

    /// Like [`StreamingContext::source_stream`], with shard leases and checkpoints in `leases`
    /// (a table shared by every worker reading the stream, e.g. `DynamoDB`).
    ///
    /// # Errors
    /// [`Error::Config`] if the receiver configuration is invalid.
    pub fn source_stream_with_leases(
        &self,
        source: Arc<dyn Source>,
        leases: Arc<dyn LeaseStore>,
        config: ReceiverConfig,
    ) -> Result<DStream<Bytes>> {
        self.receiver_stream(source, Some(leases), config)
    }

    fn receiver_stream(
        &self,
        source: Arc<dyn Source>,
        leases: Option<Arc<dyn LeaseStore>>,
        config: ReceiverConfig,
    ) -> Result<DStream<Bytes>> {
        config.validate().map_err(|e| Error::Config {
            field: "receiver",
            reason: e.to_string(),
        })?;
        let stream: Arc<str> = Arc::from(source.stream_name());
        let leases: Arc<dyn LeaseStore> = if let Some(leases) = leases {
            leases
        } else {
            let lease_file = self.config.data_dir.join("leases").join(format!("{stream}.json"));
            Arc::new(LocalLeaseStore::open(&lease_file)?)
        };
        let mut inputs = self.inputs.lock().expect("inputs");
        let input_id = self.graph.add_input()?;
        inputs.push(InputSpec {
            input_id,
            stream,
            source,
            leases,
            config,
        });
        Ok(DStream {
            node: Arc::new(PayloadInputNode { input_id }),
            graph: self.graph.clone(),
        })
    }

    /// A stream of record payloads from stream `stream` of the embedded local log in `dir`.
    ///
    /// # Errors
    /// [`Error::LocalLog`] if the log or stream cannot be opened; configuration errors.
    pub fn local_log_stream(&self, dir: &Path, stream: &str, config: ReceiverConfig) -> Result<DStream<Bytes>> {
        let log = LocalLog::open(dir)?;
        let stream = log.stream(stream)?;
        self.source_stream(Arc::new(stream), config)
    }
}

/// A Kinesis input: which stream, which application (it names the `DynamoDB` lease table shared
/// by every worker of the application, as in the KCL), and how the receiver cuts blocks.
///
/// Region, credentials and endpoints come from `kinesis.aws` and the SDK's default chain
/// (`AWS_REGION`, `AWS_ENDPOINT_URL_KINESIS`, `AWS_ENDPOINT_URL_DYNAMODB`, profiles, …). The
/// checkpoint interval, initial position, worker id and lease timings are in `receiver`.
#[cfg(feature = "kinesis")]
#[derive(Debug, Clone)]
pub struct KinesisInput {
    /// The stream and how to read it.
    pub kinesis: sluice_receiver::kinesis::KinesisConfig,
    /// The application name: the lease table's name.
    pub application_name: String,
    /// Lease-table retries.
    pub leases: sluice_receiver::DynamoLeaseOptions,
    /// Blocks, checkpoints, leases, initial position.
    pub receiver: ReceiverConfig,
    /// Several streams in one application (KCL multi-stream mode): when set, every stream the
    /// list names is read — the list is asked again at every lease scan, so streams can be added
    /// and removed at run time — and `kinesis.stream_name` is only the label block ranges carry.
    /// Lease keys are then `account:stream:creationEpoch:shardId`. See
    /// [`KinesisInput::multi_stream`].
    pub streams: Option<sluice_receiver::kinesis::StreamList>,
}

#[cfg(feature = "kinesis")]
impl KinesisInput {
    /// An input for `stream_name` of application `application_name`, defaults elsewhere.
    pub fn new(stream_name: impl Into<String>, application_name: impl Into<String>) -> Self {
        Self {
            kinesis: sluice_receiver::kinesis::KinesisConfig::new(stream_name),
            application_name: application_name.into(),
            leases: sluice_receiver::DynamoLeaseOptions::default(),
            receiver: ReceiverConfig::default(),
            streams: None,
        }
    }

    /// An input over every stream `streams` names, for application `application_name` (the
    /// lease table; also the label of the input's block ranges), defaults elsewhere.
    pub fn multi_stream(
        streams: impl Into<sluice_receiver::kinesis::StreamList>,
        application_name: impl Into<String>,
    ) -> Self {
        let application_name = application_name.into();
        Self {
            streams: Some(streams.into()),
            ..Self::new(application_name.clone(), application_name)
        }
    }
}

#[cfg(feature = "kinesis")]
impl StreamingContext {
    /// A stream of record payloads read from a Kinesis stream, with shard leases and
    /// checkpoints in the application's `DynamoDB` lease table (KCL schema; created on demand).
    ///
    /// Connects at once, so a missing stream, an unknown region or an unreachable endpoint fails
    /// here with a message that names the fix. Checkpoints follow the durability order: a shard
    /// position is written only after the blocks covering it are stored and logged.
    ///
    /// # Errors
    /// [`Error::Kinesis`], [`Error::LeaseTable`], [`Error::Config`].
    pub fn kinesis_stream(&self, input: KinesisInput) -> Result<DStream<Bytes>> {
        let source: Arc<dyn Source> = match &input.streams {
            None => Arc::new(sluice_receiver::kinesis::KinesisSource::connect(input.kinesis.clone())?),
            Some(streams) => Arc::new(sluice_receiver::kinesis::MultiStreamSource::connect(
                input.kinesis.clone(),
                streams.clone(),
            )?),
        };
        let leases =
            sluice_receiver::DynamoLeaseStore::connect(&input.kinesis.aws, &input.application_name, input.leases)?;
        self.source_stream_with_leases(source, Arc::new(leases), input.receiver)
    }
}
