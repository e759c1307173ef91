//! What the Kinesis source and the `DynamoDB` lease store share: connection settings, the SDK
//! configuration built from them, and the bridge from this crate's threads to the async SDK.
//!
//! The receiver is thread-based (see the crate docs); the AWS SDK is async. Every SDK call runs
//! on one small process-wide tokio runtime and the calling thread waits for its result over a
//! channel ([`block_on`]), which works from any thread — a shard loop, a rayon task replaying a
//! block, or a thread that is itself inside another tokio runtime.

use std::future::Future;
use std::sync::OnceLock;
use std::time::Duration;

use aws_config::{BehaviorVersion, Region, SdkConfig};

use crate::ConfigError;

/// How to reach AWS (or an emulator on loopback).
///
/// Credentials always come from the SDK's default chain (environment, profile, web identity,
/// container and instance metadata). Unset fields fall back to the SDK's own sources: `region`
/// to `AWS_REGION` / the profile, endpoints to `AWS_ENDPOINT_URL_KINESIS`,
/// `AWS_ENDPOINT_URL_DYNAMODB` and `AWS_ENDPOINT_URL`.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AwsSettings {
    /// The region, e.g. `us-east-1`.
    pub region: Option<String>,
    /// Endpoint override for Kinesis, e.g. `http://127.0.0.1:4567` for kinesis-local.
    pub kinesis_endpoint: Option<String>,
    /// Endpoint override for `DynamoDB`.
    pub dynamodb_endpoint: Option<String>,
    /// Time limit for establishing a connection (ms); an unreachable endpoint fails after it.
    pub connect_timeout_ms: Option<u64>,
    /// Time limit for one call including retries (ms).
    pub operation_timeout_ms: Option<u64>,
}

impl AwsSettings {
    /// Default connect timeout.
    pub const DEFAULT_CONNECT_TIMEOUT_MS: u64 = 3_000;
    /// Default time limit per call (`GetRecords` answers within a few seconds).
    pub const DEFAULT_OPERATION_TIMEOUT_MS: u64 = 30_000;

    /// Checks the values that can be checked without the network.
    ///
    /// # Errors
    /// [`ConfigError`] naming the field: a region that is not of the form `xx-name-N` (the fix:
    /// a real region such as `us-east-1`), an endpoint that is not an `http(s)://` URL.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if let Some(region) = &self.region
            && !is_region_shaped(region)
        {
            return Err(ConfigError::new(
                "region",
                format!("{region:?} is not an AWS region name; use one such as \"us-east-1\" or \"eu-west-2\""),
            ));
        }
        for (field, endpoint) in [
            ("kinesis_endpoint", &self.kinesis_endpoint),
            ("dynamodb_endpoint", &self.dynamodb_endpoint),
        ] {
            if let Some(url) = endpoint
                && !(url.starts_with("http://") || url.starts_with("https://"))
            {
                return Err(ConfigError::new(
                    field,
                    format!("{url:?} is not an http(s) URL; use e.g. \"http://127.0.0.1:4567\""),
                ));
            }
        }
        for (field, value) in [
            ("connect_timeout_ms", self.connect_timeout_ms),
            ("operation_timeout_ms", self.operation_timeout_ms),
        ] {
            if value == Some(0) {
                return Err(ConfigError::new(field, "must be at least 1 ms"));
            }
        }
        Ok(())
    }

    /// Loads the SDK configuration: these settings over the SDK's default sources.
    ///
    /// # Errors
    /// [`ConfigError`] from [`AwsSettings::validate`], or when no region is set anywhere.
    pub fn load(&self) -> Result<SdkConfig, ConfigError> {
        self.validate()?;
        let timeouts = aws_config::timeout::TimeoutConfig::builder()
            .connect_timeout(Duration::from_millis(
                self.connect_timeout_ms.unwrap_or(Self::DEFAULT_CONNECT_TIMEOUT_MS),
            ))
            .operation_timeout(Duration::from_millis(
                self.operation_timeout_ms.unwrap_or(Self::DEFAULT_OPERATION_TIMEOUT_MS),
            ))
            .build();
        let mut loader = aws_config::defaults(BehaviorVersion::latest())
            .timeout_config(timeouts)
            .http_client(http_client());
        if let Some(region) = &self.region {
            loader = loader.region(Region::new(region.clone()));
        }
        let config = block_on(async move { loader.load().await });
        match config.region() {
            Some(region) if is_region_shaped(region.as_ref()) => Ok(config),
            Some(region) => Err(ConfigError::new(
                "region",
                format!(
                    "{region} (from the environment or profile) is not an AWS region name; set AWS_REGION to one such as \"us-east-1\""
                ),
            )),
            None => Err(ConfigError::new(
                "region",
                "no region is set; set `region` or AWS_REGION (e.g. \"us-east-1\")",
            )),
        }
    }

    /// A Kinesis client for `config` with this settings' endpoint override and the SDK's own
    /// retries off: throttles and transient failures are retried (and counted) by the callers.
    pub(crate) fn kinesis_client(&self, config: &SdkConfig) -> aws_sdk_kinesis::Client {
        let mut builder = aws_sdk_kinesis::config::Builder::from(config)
            .retry_config(aws_sdk_kinesis::config::retry::RetryConfig::disabled());
        if let Some(url) = &self.kinesis_endpoint {
            builder = builder.endpoint_url(url);
        }
        aws_sdk_kinesis::Client::from_conf(builder.build())
    }

    /// A `DynamoDB` client for `config`, like [`AwsSettings::kinesis_client`].
    pub(crate) fn dynamodb_client(&self, config: &SdkConfig) -> aws_sdk_dynamodb::Client {
        let mut builder = aws_sdk_dynamodb::config::Builder::from(config)
            .retry_config(aws_sdk_dynamodb::config::retry::RetryConfig::disabled());
        if let Some(url) = &self.dynamodb_endpoint {
            builder = builder.endpoint_url(url);
        }
        aws_sdk_dynamodb::Client::from_conf(builder.build())
    }

    /// The endpoint a client of `service` (`kinesis`, `dynamodb`) talks to, for error messages:
    /// the override, else `AWS_ENDPOINT_URL_<SERVICE>`, else `AWS_ENDPOINT_URL`, else AWS's.
    pub(crate) fn endpoint_of(&self, service: &str, config: &SdkConfig) -> String {
        let configured = match service {
            "kinesis" => &self.kinesis_endpoint,
            _ => &self.dynamodb_endpoint,
        };
        configured
            .clone()
            .or_else(|| std::env::var(format!("AWS_ENDPOINT_URL_{}", service.to_ascii_uppercase())).ok())
            .or_else(|| config.endpoint_url().map(str::to_owned))
            .unwrap_or_else(|| {
                let region = config.region().map_or("(none)", |r| r.as_ref());
                format!("https://{service}.{region}.amazonaws.com")
            })
    }
}

/// `xx-name-N` (and the partitions' longer forms: `us-gov-west-1`, `cn-north-1`, `eu-central-2`).
fn is_region_shaped(region: &str) -> bool {
    let parts: Vec<&str> = region.split('-').collect();
    parts.len() >= 3
        && parts[0].len() == 2
        && parts
            .iter()
            .all(|p| !p.is_empty() && p.bytes().all(|b| b.is_ascii_alphanumeric()))
        && parts[..parts.len() - 1]
            .iter()
            .all(|p| p.bytes().all(|b| b.is_ascii_lowercase()))
        && parts[parts.len() - 1].bytes().all(|b| b.is_ascii_digit())
}

/// The process-wide runtime every SDK call runs on: two worker threads are plenty for polling
/// `GetRecords` and lease writes (the calls spend their time waiting on the network).
fn runtime() -> &'static tokio::runtime::Runtime {
    static RUNTIME: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RUNTIME.get_or_init(|| {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("sluice-aws")
            .enable_all()
            .build()
            .expect("cannot start the tokio runtime for AWS calls (out of threads or file descriptors)")
    })
}

/// Starts `future` on the shared runtime and returns its handle; the caller owns the task (it
/// aborts it or waits for it), nothing is detached.
pub(crate) fn spawn<F>(future: F) -> tokio::task::JoinHandle<F::Output>
where
    F: Future + Send + 'static,
    F::Output: Send + 'static,
{
    runtime().spawn(future)
}

/// Runs `future` on the shared runtime and waits for its output on the calling thread.
pub(crate) fn block_on<F>(future: F) -> F::Output
where
    F: Future + Send + 'static,
    F::Output: Send + 'static,
{
    let (tx, rx) = std::sync::mpsc::sync_channel(1);
    runtime().spawn(async move {
        // The receiver only goes away if the waiting thread panicked; nothing to report then.
        let _ = tx.send(future.await);
    });
    rx.recv()
        .expect("an AWS call panicked on the runtime (see the panic message above)")
}

/// The HTTPS client of every AWS SDK client Sluice builds: the SDK's hyper client on rustls with
/// `ring`, the one TLS provider of a build with the `kinesis` feature (`object_store`'s S3 client
/// needs `ring` too; the SDK's default client would add `aws-lc-rs`). An SDK client configured
/// by hand (a test's raw `DynamoDB` client) needs it as well: without it the SDK has no HTTP client.
#[must_use]
pub fn http_client() -> aws_sdk_kinesis::config::SharedHttpClient {
    use aws_smithy_http_client::tls::{Provider, rustls_provider::CryptoMode};
    aws_smithy_http_client::Builder::new()
        .tls_provider(Provider::Rustls(CryptoMode::Ring))
        .build_https()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn region_names() {
        for ok in [
            "us-east-1",
            "eu-west-2",
            "us-gov-west-1",
            "cn-north-1",
            "ap-southeast-4",
        ] {
            assert!(is_region_shaped(ok), "{ok}");
        }
        for bad in ["", "useast1", "us-east", "US-EAST-1", "us-east-x", "mars-1", "us--1"] {
            assert!(!is_region_shaped(bad), "{bad}");
        }
    }

    #[test]
    fn bad_settings_name_their_field() {
        let bad_region = AwsSettings {
            region: Some("moon".into()),
            ..AwsSettings::default()
        };
        assert_eq!(bad_region.validate().unwrap_err().field, "region");
        let bad_endpoint = AwsSettings {
            kinesis_endpoint: Some("127.0.0.1:4567".into()),
            ..AwsSettings::default()
        };
        assert_eq!(bad_endpoint.validate().unwrap_err().field, "kinesis_endpoint");
    }

    #[test]
    fn block_on_works_inside_another_runtime() {
        let outer = tokio::runtime::Builder::new_current_thread().build().unwrap();
        let got = outer.block_on(async { block_on(async { 41 + 1 }) });
        assert_eq!(got, 42);
    }
}
