//! [`KinesisMetrics`] as the [`NamedCounter`]s a [`Source`](crate::Source) reports for
//! monitoring (the engine exports them as `sluice_source_<name>_total{stream=…}`).

use super::KinesisMetrics;
use crate::NamedCounter;

impl KinesisMetrics {
    /// Every counter, named and explained.
    pub fn counters(&self) -> Vec<NamedCounter> {
        vec![
            NamedCounter::new(
                "get_records_calls",
                "GetRecords calls made by shard readers.",
                self.get_records_calls,
            ),
            NamedCounter::new(
                "kinesis_records_read",
                "Kinesis records (before KPL de-aggregation) returned to shard readers.",
                self.kinesis_records_read,
            ),
            NamedCounter::new(
                "bytes_read",
                "Payload bytes returned to shard readers.",
                self.bytes_read,
            ),
            NamedCounter::new(
                "shard_iterators_requested",
                "GetShardIterator calls (opening and re-opening readers, replay starts).",
                self.shard_iterators_requested,
            ),
            NamedCounter::new(
                "throttles",
                "Kinesis calls the service throttled (ProvisionedThroughputExceeded, LimitExceeded, KMS).",
                self.throttles,
            ),
            NamedCounter::new(
                "expired_iterators",
                "Shard iterators the service reported expired.",
                self.expired_iterators,
            ),
            NamedCounter::new(
                "invalid_aggregates",
                "Records with the KPL magic that failed its MD5 or protobuf check (delivered whole).",
                self.invalid_aggregates,
            ),
            NamedCounter::new("replays", "Replays of sequence-number ranges served.", self.replays),
            NamedCounter::new(
                "replay_records",
                "User records returned by replays.",
                self.replay_records,
            ),
            NamedCounter::new(
                "replay_get_records_calls",
                "GetRecords calls made by replays.",
                self.replay_get_records_calls,
            ),
            NamedCounter::new(
                "budget_wait_ms",
                "Milliseconds calls waited for their shard's read budget (5 reads/s, 2 MB/s).",
                self.budget_wait_ms,
            ),
            NamedCounter::new(
                "subscriptions",
                "SubscribeToShard calls made by enhanced fan-out readers.",
                self.subscriptions,
            ),
            NamedCounter::new(
                "subscription_renewals",
                "Fan-out subscriptions renewed before their expiry or ended by the service.",
                self.subscription_renewals,
            ),
            NamedCounter::new(
                "subscription_errors",
                "Fan-out subscriptions that failed (throttles included) or went silent.",
                self.subscription_errors,
            ),
            NamedCounter::new(
                "silent_subscriptions",
                "Fan-out subscriptions that went silent for the event timeout and were replaced.",
                self.silent_subscriptions,
            ),
            NamedCounter::new(
                "fan_out_events",
                "Events fan-out subscriptions delivered (empty ones included).",
                self.fan_out_events,
            ),
            NamedCounter::new(
                "fan_out_end_checks",
                "Checks whether an idle subscribed shard was closed and read to its end.",
                self.fan_out_end_checks,
            ),
        ]
    }
}
