//! Several Kinesis streams read as one source by one application: KCL's multi-stream mode.
//!
//! A [`MultiStreamSource`] reads every stream a [`StreamListProvider`] names, each through its
//! own [`KinesisSource`] (the same settings: region, reader type, pacing), and presents their
//! shards to the receiver as one sharded log whose shard ids are the KCL 2.x/3.x multi-stream
//! lease keys, `account:stream:creationEpoch:shardId`. So one lease table holds the leases of
//! every stream in the form a Java KCL multi-stream application uses, the receiver balances all
//! of them over the application's workers, and each record, block range and checkpoint names its
//! stream through its shard id.
//!
//! The stream list is asked again at every shard sync (the receiver's lease scan, every
//! `lease_taker_interval_ms`). A stream that appears is connected and its shards get leases; a
//! stream that disappears is *retired*: its shards are reported by [`Source::is_retired`], so
//! receivers stop reading them, checkpoint each at exactly what they stored and release their
//! leases — which stay in the table (KCL's default, `NoLeaseDeletionStrategy`), so the stream
//! resumes where it stopped if it is listed again. A stream deleted and created again under the
//! same name has a new creation epoch, hence new lease keys.
//!
//! Replay dispatches each range to its stream's source by the range's shard id.

use std::collections::{BTreeMap, HashSet};
use std::fmt;
use std::sync::{Arc, Mutex};

use sluice_blockstore::{Record, Replay, ReplayError, SequenceNumberRange, SequenceNumberRanges};

use super::{KinesisConfig, KinesisError, KinesisMetrics, KinesisSource};
use crate::lease::split_multi_stream_key;
use crate::source::{
    ReadBatch, ReadPacing, ShardInfo, ShardReader, Source, SourceError, SourceRelease, StartingPosition,
};

/// Names the streams an application reads; asked at every shard sync, so the list may change
/// while the application runs (KCL's `MultiStreamTracker`).
///
/// ```
/// use sluice_receiver::kinesis::StreamListProvider;
/// let fixed = vec!["clicks".to_owned(), "orders".to_owned()];
/// assert_eq!(fixed.stream_names()?, ["clicks", "orders"]);
/// let from_a_closure = || -> Result<Vec<String>, sluice_receiver::SourceError> { Ok(vec!["clicks".to_owned()]) };
/// assert_eq!(from_a_closure.stream_names()?, ["clicks"]);
/// # Ok::<(), sluice_receiver::SourceError>(())
/// ```
pub trait StreamListProvider: Send + Sync {
    /// The names of the streams to read now. Called from the receiver's coordinator thread at
    /// every lease scan: keep it cheap (cache inside if it calls a service).
    ///
    /// # Errors
    /// A [`SourceError`]; the receiver retries at the next scan and keeps the previous list's
    /// streams meanwhile.
    fn stream_names(&self) -> Result<Vec<String>, SourceError>;
}

impl StreamListProvider for Vec<String> {
    fn stream_names(&self) -> Result<Vec<String>, SourceError> {
        Ok(self.clone())
    }
}

impl<F> StreamListProvider for F
where
    F: Fn() -> Result<Vec<String>, SourceError> + Send + Sync,
{
    fn stream_names(&self) -> Result<Vec<String>, SourceError> {
        self()
    }
}

/// A shared [`StreamListProvider`]: what [`MultiStreamSource::connect`] and the engine's
/// `KinesisInput::streams` take.
///
/// ```
/// use sluice_receiver::SourceError;
/// use sluice_receiver::kinesis::StreamList;
/// let fixed = StreamList::from(vec!["clicks".to_owned(), "orders".to_owned()]);
/// // Re-read at every lease scan: edit the file to add or remove streams at run time.
/// let changing = StreamList::new(|| -> Result<Vec<String>, SourceError> {
///     let text = std::fs::read_to_string("streams.txt").map_err(|e| SourceError::Invalid(e.to_string()))?;
///     Ok(text.lines().map(str::to_owned).collect())
/// });
/// # let _ = (fixed, changing);
/// ```
#[derive(Clone)]
pub struct StreamList(Arc<dyn StreamListProvider>);

impl StreamList {
    /// A list asked of `provider`.
    pub fn new(provider: impl StreamListProvider + 'static) -> Self {
        Self(Arc::new(provider))
    }

    /// A list asked of a shared provider (one the caller keeps and changes).
    pub fn shared(provider: Arc<dyn StreamListProvider>) -> Self {
        Self(provider)
    }

    /// The stream names now.
    ///
    /// # Errors
    /// What the provider returned.
    pub fn stream_names(&self) -> Result<Vec<String>, SourceError> {
        self.0.stream_names()
    }
}

impl From<Vec<String>> for StreamList {
    fn from(names: Vec<String>) -> Self {
        Self::new(names)
    }
}

impl fmt::Debug for StreamList {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("StreamList(..)")
    }
}

/// The stream identifier (`account:stream:creationEpoch`) of a multi-stream shard id.
fn identifier_of(key: &str) -> Option<&str> {
    split_multi_stream_key(key).map(|(identifier, _)| identifier)
}

/// The streams currently read, by identifier, and which names map to which identifier.
#[derive(Default)]
struct Streams {
    /// Connected sources by stream identifier.
    by_identifier: BTreeMap<String, KinesisSource>,
    /// Identifiers of the streams the provider lists now.
    listed: HashSet<String>,
}

/// Several streams as one [`Source`], for one application: shard ids are KCL multi-stream lease
/// keys (`account:stream:creationEpoch:shardId`), the stream list is asked again at every shard
/// sync, and the shards of streams no longer listed are retired ([`Source::is_retired`]). See
/// `docs/kinesis.md`, "Several streams in one application".
pub struct MultiStreamSource {
    label: Arc<str>,
    template: KinesisConfig,
    provider: StreamList,
    streams: Mutex<Streams>,
}

impl fmt::Debug for MultiStreamSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let streams = self.streams.lock().expect("streams lock");
        f.debug_struct("MultiStreamSource")
            .field("label", &self.label)
            .field("streams", &streams.by_identifier.keys().collect::<Vec<_>>())
            .finish_non_exhaustive()
    }
}

impl MultiStreamSource {
    /// Every stream's source, as the table holds them now (the lock is not held while they are
    /// used).
    fn sources(&self) -> Vec<KinesisSource> {
        self.streams
            .lock()
            .expect("streams lock")
            .by_identifier
            .values()
            .cloned()
            .collect()
    }

    /// Connects to every stream `provider` lists now (each with `template`'s settings and its
    /// own name), so a missing stream or bad settings fail here. `template.stream_name` is the
    /// label block ranges carry (the engine uses the application name); it must be a valid
    /// stream name but no stream of that name is read.
    ///
    /// # Errors
    /// [`KinesisError`]: invalid settings, a listed stream that does not exist, an unreachable
    /// endpoint, a provider that fails (as [`KinesisError::Source`]).
    pub fn connect(template: KinesisConfig, provider: StreamList) -> Result<Self, KinesisError> {
        template.validate()?;
        let source = Self {
            label: Arc::from(template.stream_name.as_str()),
            template,
            provider,
            streams: Mutex::new(Streams::default()),
        };
        let names = source.provider.stream_names()?;
        let mut streams = Streams::default();
        for name in names {
            let stream = source.connect_stream(&name)?;
            streams.listed.insert(stream.stream_identifier().to_owned());
            streams
                .by_identifier
                .insert(stream.stream_identifier().to_owned(), stream);
        }
        *source.streams.lock().expect("streams lock") = streams;
        Ok(source)
    }

    fn connect_stream(&self, name: &str) -> Result<KinesisSource, KinesisError> {
        KinesisSource::connect(KinesisConfig {
            stream_name: name.to_owned(),
            ..self.template.clone()
        })
    }

    /// The sources of the streams listed now, by identifier.
    pub fn streams(&self) -> Vec<(String, KinesisSource)> {
        let streams = self.streams.lock().expect("streams lock");
        streams
            .by_identifier
            .iter()
            .filter(|(id, _)| streams.listed.contains(*id))
            .map(|(id, s)| (id.clone(), s.clone()))
            .collect()
    }

    /// Asks the provider again: connects streams that appeared, marks those that disappeared
    /// as no longer listed. A stream that cannot be connected yet (being created) is tried
    /// again at the next call; a failing provider keeps the previous list.
    fn refresh(&self) {
        let names = match self.provider.stream_names() {
            Ok(names) => names,
            Err(e) => {
                tracing::warn!(label = %self.label, error = %e, "the stream list provider failed; keeping the previous list");
                return;
            }
        };
        let known: BTreeMap<String, String> = {
            let streams = self.streams.lock().expect("streams lock");
            streams
                .by_identifier
                .iter()
                .map(|(id, s)| (s.stream_name().to_owned(), id.clone()))
                .collect()
        };
        let mut listed = HashSet::new();
        let mut connected = Vec::new();
        for name in names {
            if let Some(id) = known.get(&name) {
                listed.insert(id.clone());
                continue;
            }
            match self.connect_stream(&name) {
                Ok(stream) => {
                    tracing::info!(label = %self.label, stream = %name, identifier = stream.stream_identifier(), "reading a new stream");
                    listed.insert(stream.stream_identifier().to_owned());
                    connected.push(stream);
                }
                Err(e) => {
                    tracing::warn!(label = %self.label, stream = %name, error = %e, "cannot read a listed stream yet");
                }
            }
        }
        let mut streams = self.streams.lock().expect("streams lock");
        for stream in connected {
            streams
                .by_identifier
                .insert(stream.stream_identifier().to_owned(), stream);
        }
        for id in streams.listed.difference(&listed) {
            tracing::info!(label = %self.label, identifier = %id, "a stream is no longer listed; its shards retire");
        }
        streams.listed = listed;
    }

    /// The source of the stream `key` (a multi-stream shard id) belongs to, and the plain shard id.
    fn route<'k>(&self, key: &'k str) -> Result<(KinesisSource, &'k str), SourceError> {
        let unknown = || SourceError::UnknownShard {
            stream: self.label.to_string(),
            shard_id: key.to_owned(),
        };
        let (identifier, shard) = split_multi_stream_key(key).ok_or_else(unknown)?;
        let streams = self.streams.lock().expect("streams lock");
        let source = streams.by_identifier.get(identifier).ok_or_else(unknown)?.clone();
        Ok((source, shard))
    }
}

/// Prefixes a shard id with its stream identifier.
fn key(identifier: &str, shard: &str) -> Arc<str> {
    Arc::from(format!("{identifier}:{shard}"))
}

impl Source for MultiStreamSource {
    fn stream_name(&self) -> &str {
        &self.label
    }

    fn read_pacing(&self) -> ReadPacing {
        // Every stream has the template's settings.
        let streams = self.streams.lock().expect("streams lock");
        streams
            .by_identifier
            .values()
            .next()
            .map_or_else(ReadPacing::default, Source::read_pacing)
    }

    /// The counters of every stream's source, added up (the same names as one stream's). A
    /// stream deleted from Kinesis leaves the sum, so a counter can fall then (a reset to a
    /// monitor); a stream only removed from the list keeps counting in.
    fn counters(&self) -> Vec<crate::NamedCounter> {
        let streams = self.sources();
        let mut sum = KinesisMetrics::default().counters();
        for stream in &streams {
            for (total, counter) in sum.iter_mut().zip(stream.counters()) {
                debug_assert_eq!(total.name, counter.name);
                total.value += counter.value;
            }
        }
        sum
    }

    fn list_shards(&self) -> Result<Vec<ShardInfo>, SourceError> {
        self.refresh();
        let mut all = Vec::new();
        for (identifier, stream) in self.streams() {
            let shards = match stream.list_shards() {
                Ok(shards) => shards,
                // Deleted since: retire it; a stream created again under the name gets a new
                // identifier at the next refresh.
                Err(SourceError::UnknownShard { .. }) => {
                    tracing::warn!(label = %self.label, identifier = %identifier, "a listed stream no longer exists");
                    self.streams
                        .lock()
                        .expect("streams lock")
                        .by_identifier
                        .remove(&identifier);
                    continue;
                }
                Err(e) => return Err(e),
            };
            all.extend(shards.into_iter().map(|s| ShardInfo {
                shard_id: key(&identifier, &s.shard_id),
                parent_shard_ids: s.parent_shard_ids.iter().map(|p| key(&identifier, p)).collect(),
                ..s
            }));
        }
        Ok(all)
    }

    fn open_reader(&self, shard_id: &str, start: &StartingPosition) -> Result<Box<dyn ShardReader>, SourceError> {
        let (source, shard) = self.route(shard_id)?;
        let identifier = &shard_id[..shard_id.len() - shard.len() - 1];
        Ok(Box::new(KeyedReader {
            inner: source.open_reader(shard, start)?,
            key: Arc::from(shard_id),
            identifier: identifier.to_owned(),
        }))
    }

    fn is_retired(&self, shard_id: &str) -> bool {
        let Some(identifier) = identifier_of(shard_id) else {
            return false;
        };
        let streams = self.streams.lock().expect("streams lock");
        !streams.listed.contains(identifier)
    }

    fn release(&self, how: &SourceRelease<'_>) {
        let streams = self.sources();
        for stream in streams {
            stream.release(how);
        }
    }
}

impl Replay for MultiStreamSource {
    fn replay(&self, ranges: &SequenceNumberRanges) -> Result<Vec<Record>, ReplayError> {
        let mut out = Vec::with_capacity(ranges.0.iter().map(|r| r.record_count as usize).sum());
        let mut i = 0;
        while i < ranges.0.len() {
            // Consecutive ranges of one stream go to its source in one call (it reads
            // consecutive ranges of a shard in one pass).
            let identifier = identifier_of(&ranges.0[i].shard_id).unwrap_or_default().to_owned();
            let mut j = i + 1;
            while j < ranges.0.len() && identifier_of(&ranges.0[j].shard_id) == Some(identifier.as_str()) {
                j += 1;
            }
            let (source, _) = self
                .route(&ranges.0[i].shard_id)
                .map_err(|_| ReplayError::UnknownShard {
                    stream: ranges.0[i].stream.to_string(),
                    shard_id: ranges.0[i].shard_id.to_string(),
                })?;
            let stream: Arc<str> = Arc::from(source.stream_name());
            let plain = SequenceNumberRanges(
                ranges.0[i..j]
                    .iter()
                    .map(|r| SequenceNumberRange {
                        stream: stream.clone(),
                        shard_id: Arc::from(&r.shard_id[identifier.len() + 1..]),
                        ..r.clone()
                    })
                    .collect(),
            );
            let keys: BTreeMap<Arc<str>, Arc<str>> = ranges.0[i..j]
                .iter()
                .map(|r| (Arc::from(&r.shard_id[identifier.len() + 1..]), r.shard_id.clone()))
                .collect();
            for mut record in source.replay(&plain)? {
                if let Some(key) = keys.get(&record.shard_id) {
                    record.shard_id = key.clone();
                }
                out.push(record);
            }
            i = j;
        }
        Ok(out)
    }
}

/// A stream's reader whose records and children carry multi-stream shard ids.
struct KeyedReader {
    inner: Box<dyn ShardReader>,
    key: Arc<str>,
    identifier: String,
}

impl ShardReader for KeyedReader {
    fn read(&mut self, max_records: usize) -> Result<ReadBatch, SourceError> {
        let mut batch = self.inner.read(max_records)?;
        for record in &mut batch.records {
            record.shard_id = self.key.clone();
        }
        if let Some(children) = &mut batch.end_of_shard {
            for child in children.iter_mut() {
                *child = key(&self.identifier, child);
            }
        }
        Ok(batch)
    }

    fn resume_position(&self) -> Option<StartingPosition> {
        self.inner.resume_position()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn multi_stream_keys_split_like_the_kcl_serializes_them() {
        assert_eq!(
            split_multi_stream_key("000000000000:a.b-c_d:1700000000:shardId-000000000007"),
            Some(("000000000000:a.b-c_d:1700000000", "shardId-000000000007"))
        );
        for plain in [
            "shardId-000000000007",
            "a:shardId-1",
            "a:b:shardId-1",
            "a:b:c:",
            "a::c:shardId-1",
        ] {
            assert_eq!(split_multi_stream_key(plain), None, "{plain}");
        }
        assert_eq!(&*key("1:s:2", "shardId-3"), "1:s:2:shardId-3");
        assert_eq!(identifier_of("1:s:2:shardId-3"), Some("1:s:2"));
    }
}
