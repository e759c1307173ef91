//! Turning a location URL into an [`ObjectStore`] and a root path inside it.
//!
//! The URL forms and the S3 configuration are documented on [`object_store_from_url`].
//!
//! S3 is behind this crate's `s3` feature: it pulls in an HTTP client, TLS and a crypto library
//! (about 40 crates), which a pipeline on local directories never uses, so a first build of the
//! local-log examples does not pay for it. Without the feature an `s3://` URL is rejected with
//! [`Error::InvalidUrl`] naming the feature to turn on.

use std::collections::HashMap;
#[cfg(feature = "s3")]
use std::str::FromStr;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use object_store::ObjectStore;
#[cfg(feature = "s3")]
use object_store::aws::{AmazonS3Builder, AmazonS3ConfigKey};
use object_store::local::LocalFileSystem;
use object_store::memory::InMemory;
use object_store::path::Path as ObjectPath;

use crate::{Error, Result};

/// At most this many retries of one object-store request.
pub const DEFAULT_OBJECT_STORE_MAX_RETRIES: usize = 3;
/// Retries of one object-store request stop after this long.
pub const DEFAULT_OBJECT_STORE_RETRY_TIMEOUT: Duration = Duration::from_secs(10);

const SUPPORTED: &str =
    "use file:///absolute/dir (or a plain path), memory://<name>/<prefix> or s3://<bucket>/<prefix>";

/// Named in-memory stores shared by every `memory://<name>` URL in this process.
fn memory_stores() -> &'static Mutex<HashMap<String, Arc<InMemory>>> {
    static STORES: OnceLock<Mutex<HashMap<String, Arc<InMemory>>>> = OnceLock::new();
    STORES.get_or_init(|| Mutex::new(HashMap::new()))
}

fn invalid(url: &str, reason: impl Into<String>) -> Error {
    Error::InvalidUrl {
        url: url.to_owned(),
        reason: reason.into(),
    }
}

/// Splits `authority/rest` into the authority and a root path.
fn split_authority(url: &str, rest: &str) -> Result<(String, ObjectPath)> {
    let (authority, prefix) = rest.split_once('/').unwrap_or((rest, ""));
    let prefix = prefix.trim_matches('/');
    let root = ObjectPath::parse(prefix).map_err(|e| invalid(url, format!("bad path {prefix:?}: {e}")))?;
    Ok((authority.to_owned(), root))
}

/// Checks the form of `url` without connecting to anything or creating directories.
///
/// # Errors
/// [`Error::InvalidUrl`] naming the URL and the fix.
pub(crate) fn check_url(url: &str) -> Result<()> {
    if url.is_empty() {
        return Err(invalid(url, format!("the URL is empty; {SUPPORTED}")));
    }
    if let Some(rest) = url.strip_prefix("memory://") {
        let (name, _) = split_authority(url, rest)?;
        if name.is_empty() {
            return Err(invalid(url, "missing store name; use memory://<name>/<prefix>"));
        }
        return Ok(());
    }
    if let Some(rest) = url.strip_prefix("s3://") {
        let (bucket, _) = split_authority(url, rest)?;
        if bucket.is_empty() {
            return Err(invalid(url, "missing bucket; use s3://<bucket>/<prefix>"));
        }
        if !cfg!(feature = "s3") {
            return Err(s3_not_built(url));
        }
        return Ok(());
    }
    if let Some(path) = url.strip_prefix("file://") {
        if !path.starts_with('/') {
            return Err(invalid(
                url,
                "a file:// URL needs an absolute path (file:///abs/dir); write a relative directory as a plain path",
            ));
        }
        return Ok(());
    }
    if let Some((scheme, _)) = url.split_once("://") {
        let hint = match scheme {
            "gs" | "az" | "abfs" | "abfss" | "http" | "https" => {
                " (this build of Sluice has the S3 and local-file object stores only)"
            }
            _ => "",
        };
        return Err(invalid(
            url,
            format!("unsupported scheme {scheme}://{hint}; {SUPPORTED}"),
        ));
    }
    Ok(())
}

/// Opens the object store a location URL names, and the root path inside it.
///
/// Supported forms:
///
/// | URL | store |
/// |---|---|
/// | `file:///abs/dir` or a plain path `dir` | the local directory (created if missing) |
/// | `memory://<name>/<prefix>` | a process-wide in-memory store registered under `<name>`: every URL with that name in one process sees the same objects (tests, simulated restarts) |
/// | `s3://<bucket>/<prefix>` | Amazon S3 or an S3-compatible endpoint (needs the `s3` feature) |
///
/// For S3 the configuration starts from the standard AWS environment (`AWS_REGION`,
/// `AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`, `AWS_SESSION_TOKEN`, `AWS_ALLOW_HTTP`, and the
/// endpoint from `AWS_ENDPOINT_URL_S3`, else `AWS_ENDPOINT_URL`), then applies the explicit
/// options, which win. Option names are `object_store`'s S3 configuration keys, e.g. `endpoint`,
/// `allow_http`, `region`, `access_key_id`, `secret_access_key`, `conditional_put`. Requests are
/// retried at most [`DEFAULT_OBJECT_STORE_MAX_RETRIES`] times within
/// [`DEFAULT_OBJECT_STORE_RETRY_TIMEOUT`], so an unreachable endpoint fails a put in seconds, not
/// minutes.
///
/// ```
/// use std::collections::HashMap;
/// let (store, root) = sluice_blockstore::object_store_from_url("memory://docs/replica", &HashMap::new())?;
/// assert_eq!(root.as_ref(), "replica");
/// assert!(sluice_blockstore::object_store_from_url("ftp://host/x", &HashMap::new()).is_err());
/// # drop(store);
/// # Ok::<(), sluice_blockstore::Error>(())
/// ```
///
/// # Errors
/// [`Error::InvalidUrl`] for an unsupported or malformed URL, an `s3://` URL in a build without
/// the `s3` feature, an unknown S3 option, or a local directory that cannot be created; [`Error::ObjectStore`] if the store rejects its
/// configuration.
// `options` comes from config files and CLI flags, always the default hasher.
#[allow(clippy::implicit_hasher)]
pub fn object_store_from_url(
    url: &str,
    options: &HashMap<String, String>,
) -> Result<(Arc<dyn ObjectStore>, ObjectPath)> {
    check_url(url)?;
    if let Some(rest) = url.strip_prefix("memory://") {
        if !options.is_empty() {
            return Err(invalid(url, "memory:// stores take no options; remove them"));
        }
        let (name, root) = split_authority(url, rest)?;
        let store = Arc::clone(
            memory_stores()
                .lock()
                .expect("memory store registry lock")
                .entry(name)
                .or_insert_with(|| Arc::new(InMemory::new())),
        );
        return Ok((store, root));
    }
    // Without the `s3` feature `check_url` has rejected an `s3://` URL.
    #[cfg(feature = "s3")]
    if let Some(rest) = url.strip_prefix("s3://") {
        let (bucket, root) = split_authority(url, rest)?;
        return Ok((s3_store(url, &bucket, options)?, root));
    }
    if !options.is_empty() {
        return Err(invalid(url, "local directories take no options; remove them"));
    }
    let dir = url.strip_prefix("file://").unwrap_or(url);
    std::fs::create_dir_all(dir).map_err(|e| invalid(url, format!("cannot create the directory: {e}")))?;
    let store = LocalFileSystem::new_with_prefix(dir).map_err(|source| Error::ObjectStore {
        location: url.to_owned(),
        source,
    })?;
    Ok((Arc::new(store), ObjectPath::default()))
}

/// The error for an `s3://` URL in a build without the `s3` feature.
fn s3_not_built(url: &str) -> Error {
    invalid(
        url,
        "this build of Sluice has no S3 support; enable the `s3` feature (`cargo run --features s3 ...`, \
         or `features = [\"s3\"]` on the sluice dependency; the `kinesis` feature includes it)",
    )
}

#[cfg(feature = "s3")]
fn s3_store(url: &str, bucket: &str, options: &HashMap<String, String>) -> Result<Arc<dyn ObjectStore>> {
    let mut builder = AmazonS3Builder::from_env().with_bucket_name(bucket);
    if let Some(endpoint) = ["AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL"]
        .iter()
        .find_map(|name| std::env::var(name).ok().filter(|v| !v.is_empty()))
    {
        builder = builder.with_endpoint(endpoint);
    }
    let mut sorted: Vec<_> = options.iter().collect();
    sorted.sort();
    for (key, value) in sorted {
        let config_key = AmazonS3ConfigKey::from_str(key).map_err(|_| {
            invalid(
                url,
                format!(
                    "unknown S3 option {key:?}; use object_store S3 keys such as endpoint, allow_http, region, access_key_id, secret_access_key"
                ),
            )
        })?;
        if config_key == AmazonS3ConfigKey::Bucket {
            return Err(invalid(url, "the bucket comes from the URL; remove the bucket option"));
        }
        builder = builder.with_config(config_key, value);
    }
    builder = builder.with_retry(object_store::RetryConfig {
        max_retries: DEFAULT_OBJECT_STORE_MAX_RETRIES,
        retry_timeout: DEFAULT_OBJECT_STORE_RETRY_TIMEOUT,
        ..object_store::RetryConfig::default()
    });
    let store = builder.build().map_err(|source| Error::ObjectStore {
        location: url.to_owned(),
        source,
    })?;
    Ok(Arc::new(store))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bad_urls_name_the_url_and_the_fix() {
        let none = HashMap::new();
        for (url, hint) in [
            ("", "empty"),
            ("s3:///prefix", "missing bucket"),
            ("memory:///x", "missing store name"),
            ("gs://bucket/x", "S3 and local-file"),
            ("file://relative/dir", "absolute path"),
        ] {
            let err = object_store_from_url(url, &none).expect_err(url);
            let text = err.to_string();
            assert!(matches!(err, Error::InvalidUrl { .. }), "{url}: {text}");
            assert!(
                text.contains(hint) && text.contains(&format!("{url:?}")),
                "{url}: {text}"
            );
        }
        let bad_option = HashMap::from([("no_such_option".to_owned(), "1".to_owned())]);
        let err = object_store_from_url("s3://bucket/x", &bad_option).err().unwrap();
        assert!(err.to_string().contains("no_such_option"), "{err}");
    }

    #[test]
    fn an_s3_url_without_the_feature_names_the_feature() {
        let text = s3_not_built("s3://bucket/x").to_string();
        assert!(
            text.contains("\"s3://bucket/x\"") && text.contains("`s3` feature"),
            "{text}"
        );
        let checked = check_url("s3://bucket/x");
        assert_eq!(checked.is_ok(), cfg!(feature = "s3"), "{checked:?}");
    }

    #[test]
    fn memory_urls_with_one_name_share_objects() {
        let none = HashMap::new();
        let (a, root) = object_store_from_url("memory://shared-test/p", &none).unwrap();
        let (b, _) = object_store_from_url("memory://shared-test/q", &none).unwrap();
        assert_eq!(root.as_ref(), "p");
        assert!(Arc::ptr_eq(&a, &b));
    }
}
