//! [`ToRecordBatch`]: how a batch's rows become Arrow for the Parquet sink.

use std::sync::Arc;

use arrow_array::{ArrayRef, BinaryArray, Int64Array, RecordBatch, StringArray, UInt64Array};
use arrow_schema::{DataType, Field, Schema, SchemaRef};
use bytes::Bytes;

use crate::{Error, Result};

/// Row types that can be written by [`crate::ParquetSink`].
///
/// # Contract
/// - [`ToRecordBatch::schema`] always returns the same schema for a type;
/// - [`ToRecordBatch::to_record_batch`] returns a batch with exactly that schema and one row per
///   input row, in input order (an empty slice gives an empty batch, which the sink skips);
/// - conversion is pure: the same rows always give the same batch, which is what makes re-running
///   a batch replace its output byte-for-byte.
///
/// Pairs `(key, value)` become columns `key` and `value`; a lone `String` becomes `value`. A
/// `String` or `Arc<str>` key is a `Utf8` column; a [`Bytes`] key is a `Binary` column, written
/// as it is — bytes that are not UTF-8 (a Latin-1 word, say) stay distinct keys instead of being
/// replaced by U+FFFD and merged.
///
/// ```
/// use sluice_operators::ToRecordBatch;
/// let batch = <(String, u64)>::to_record_batch(&[("a".to_owned(), 1)])?;
/// assert_eq!(batch.num_rows(), 1);
/// assert_eq!(batch.schema().field(0).name(), "key");
/// # Ok::<(), sluice_operators::Error>(())
/// ```
pub trait ToRecordBatch: Sized {
    /// The Arrow schema of the batches this type produces.
    fn schema() -> SchemaRef;

    /// Converts `rows` into one batch with [`ToRecordBatch::schema`].
    ///
    /// # Errors
    /// [`Error::Arrow`] if Arrow rejects the columns (a bug in the implementation).
    fn to_record_batch(rows: &[Self]) -> Result<RecordBatch>;
}

fn key_value_schema(value: DataType) -> SchemaRef {
    Arc::new(Schema::new(vec![
        Field::new("key", DataType::Utf8, false),
        Field::new("value", value, false),
    ]))
}

fn binary_key_value_schema(value: DataType) -> SchemaRef {
    Arc::new(Schema::new(vec![
        Field::new("key", DataType::Binary, false),
        Field::new("value", value, false),
    ]))
}

fn build(schema: SchemaRef, columns: Vec<ArrayRef>) -> Result<RecordBatch> {
    RecordBatch::try_new(schema, columns).map_err(|source| Error::Arrow {
        context: "converting rows to a record batch".to_owned(),
        source,
    })
}

/// Rows of a text key and a count.
fn text_counts<K: AsRef<str>>(rows: &[(K, u64)]) -> Result<RecordBatch> {
    let keys: StringArray = rows.iter().map(|(k, _)| Some(k.as_ref())).collect();
    let values: UInt64Array = rows.iter().map(|(_, v)| Some(*v)).collect();
    build(
        key_value_schema(DataType::UInt64),
        vec![Arc::new(keys), Arc::new(values)],
    )
}

/// Rows of a byte-string key and a count.
fn binary_counts<K: AsRef<[u8]>>(rows: &[(K, u64)]) -> Result<RecordBatch> {
    let keys: BinaryArray = rows.iter().map(|(k, _)| Some(k.as_ref())).collect();
    let values: UInt64Array = rows.iter().map(|(_, v)| Some(*v)).collect();
    build(
        binary_key_value_schema(DataType::UInt64),
        vec![Arc::new(keys), Arc::new(values)],
    )
}

impl ToRecordBatch for (String, u64) {
    fn schema() -> SchemaRef {
        key_value_schema(DataType::UInt64)
    }

    fn to_record_batch(rows: &[Self]) -> Result<RecordBatch> {
        text_counts(rows)
    }
}

impl ToRecordBatch for (String, i64) {
    fn schema() -> SchemaRef {
        key_value_schema(DataType::Int64)
    }

    fn to_record_batch(rows: &[Self]) -> Result<RecordBatch> {
        let keys: StringArray = rows.iter().map(|(k, _)| Some(k.as_str())).collect();
        let values: Int64Array = rows.iter().map(|(_, v)| Some(*v)).collect();
        build(Self::schema(), vec![Arc::new(keys), Arc::new(values)])
    }
}

impl ToRecordBatch for (Arc<str>, u64) {
    fn schema() -> SchemaRef {
        key_value_schema(DataType::UInt64)
    }

    fn to_record_batch(rows: &[Self]) -> Result<RecordBatch> {
        text_counts(rows)
    }
}

impl ToRecordBatch for (Box<str>, u64) {
    fn schema() -> SchemaRef {
        key_value_schema(DataType::UInt64)
    }

    fn to_record_batch(rows: &[Self]) -> Result<RecordBatch> {
        text_counts(rows)
    }
}

impl ToRecordBatch for (Bytes, u64) {
    fn schema() -> SchemaRef {
        binary_key_value_schema(DataType::UInt64)
    }

    fn to_record_batch(rows: &[Self]) -> Result<RecordBatch> {
        binary_counts(rows)
    }
}

impl ToRecordBatch for (crate::ByteKey, u64) {
    fn schema() -> SchemaRef {
        binary_key_value_schema(DataType::UInt64)
    }

    fn to_record_batch(rows: &[Self]) -> Result<RecordBatch> {
        binary_counts(rows)
    }
}

impl ToRecordBatch for String {
    fn schema() -> SchemaRef {
        Arc::new(Schema::new(vec![Field::new("value", DataType::Utf8, false)]))
    }

    fn to_record_batch(rows: &[Self]) -> Result<RecordBatch> {
        let values: StringArray = rows.iter().map(|v| Some(v.as_str())).collect();
        build(Self::schema(), vec![Arc::new(values)])
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow_array::Array;

    #[test]
    fn bytes_keys_stay_bytes() {
        let words = <(Bytes, u64)>::to_record_batch(&[
            (Bytes::from_static(b"caf\xe9"), 2),
            (Bytes::from_static(b"caf\xe8"), 1),
        ])
        .unwrap();
        assert_eq!(words.schema(), <(Bytes, u64)>::schema());
        let keys = words.column(0).as_any().downcast_ref::<BinaryArray>().unwrap();
        assert_eq!((keys.value(0), keys.value(1)), (&b"caf\xe9"[..], &b"caf\xe8"[..]));
        let boxed = <(crate::ByteKey, u64)>::to_record_batch(&[(b"caf\xe9"[..].into(), 2)]).unwrap();
        assert_eq!(
            boxed.schema(),
            words.schema(),
            "boxed and Bytes keys write the same column"
        );
        let keys = boxed.column(0).as_any().downcast_ref::<BinaryArray>().unwrap();
        assert_eq!(keys.value(0), &b"caf\xe9"[..]);
        let text = <(Box<str>, u64)>::to_record_batch(&[(Box::from("x"), 3)]).unwrap();
        assert_eq!(text.schema(), <(String, u64)>::schema());
    }

    #[test]
    fn batches_match_declared_schemas() {
        let a = <(String, u64)>::to_record_batch(&[("x".into(), 1), ("y".into(), 2)]).unwrap();
        assert_eq!(a.schema(), <(String, u64)>::schema());
        assert_eq!(a.num_rows(), 2);
        let b = <(String, i64)>::to_record_batch(&[("x".into(), -1)]).unwrap();
        assert_eq!(b.schema(), <(String, i64)>::schema());
        let c = <(Arc<str>, u64)>::to_record_batch(&[(Arc::from("k"), 7)]).unwrap();
        let values = c.column(1).as_any().downcast_ref::<UInt64Array>().unwrap();
        assert_eq!(values.value(0), 7);
        let d = String::to_record_batch(&[]).unwrap();
        assert_eq!(d.num_rows(), 0);
        assert_eq!(d.column(0).len(), 0);
    }
}
