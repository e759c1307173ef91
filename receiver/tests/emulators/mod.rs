//! What the Kinesis and `DynamoDB` tests share: the emulators' addresses (given by
//! `scripts/with-emulators`, a missing one fails loudly) and names no other test uses.

#![allow(dead_code, reason = "each test binary uses its own subset")]

use std::sync::atomic::{AtomicU32, Ordering};

use sluice_receiver::AwsSettings;
use sluice_receiver::kinesis::KinesisConfig;

/// An address `scripts/with-emulators` exports (`SLUICE_KINESIS_ENDPOINT`, `SLUICE_MOTO_ENDPOINT`).
///
/// # Panics
/// When it is not set: the test is not run through the script that starts the emulators.
pub fn env(name: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| {
        panic!(
            "{name} is not set: run the Kinesis and DynamoDB tests through `scripts/with-emulators cargo test ...` \
             (or `scripts/test`), which starts kinesis-local and moto"
        )
    })
}

/// kinesis-local's plain-HTTP endpoint.
pub fn kinesis_endpoint() -> String {
    env("SLUICE_KINESIS_ENDPOINT")
}

/// `prefix` made unique to this process and call (stream, table and consumer names).
pub fn unique(prefix: &str) -> String {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    format!(
        "{prefix}-{}-{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    )
}

/// A configuration of `stream` on the Kinesis at `kinesis_endpoint`, paced for the emulator
/// (20 ms between reads, 50 ms when idle, 20 ms replay backoff). Tests that keep leases in
/// `DynamoDB` add [`with_moto`].
pub fn kinesis_config(kinesis_endpoint: String, stream: impl Into<String>) -> KinesisConfig {
    KinesisConfig {
        aws: AwsSettings {
            kinesis_endpoint: Some(kinesis_endpoint),
            ..AwsSettings::default()
        },
        min_read_interval_ms: 20,
        idle_interval_ms: 50,
        replay_backoff_ms: 20,
        ..KinesisConfig::new(stream)
    }
}

/// `config` with its `DynamoDB` at moto.
pub fn with_moto(mut config: KinesisConfig) -> KinesisConfig {
    config.aws.dynamodb_endpoint = Some(env("SLUICE_MOTO_ENDPOINT"));
    config
}
