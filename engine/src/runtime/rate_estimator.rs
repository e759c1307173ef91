//! Backpressure: Spark's PID rate estimator, which turns batch timings into a receiver rate.
//!
//! After each batch the estimator compares the rate at which records were *processed* with the
//! rate it last asked for, and sets a new ingestion rate (records/s) for the receivers'
//! rate limiters. The formula and defaults are Spark's (`PIDRateEstimator`), so a tuned Spark
//! job behaves the same here:
//!
//! ```text
//! processing_rate   = records / processing_delay
//! error             = latest_rate - processing_rate
//! historical_error  = scheduling_delay * processing_rate / batch_interval
//! d_error           = (error - latest_error) / delay_since_update
//! new_rate          = max(latest_rate - Kp*error - Ki*historical_error - Kd*d_error, min_rate)
//! ```
//!
//! The first update only seeds the state and returns `None`.

use crate::config::BackpressureConfig;

/// Spark's PID rate estimator (internal; `sluice_engine::internals` with feature `testing`).
#[derive(Debug, Clone)]
pub struct PidRateEstimator {
    batch_interval_ms: i64,
    kp: f64,
    ki: f64,
    kd: f64,
    min_rate: f64,
    first_run: bool,
    latest_time_ms: i64,
    latest_rate: f64,
    latest_error: f64,
}

impl PidRateEstimator {
    /// An estimator for batches of `batch_interval_ms`.
    pub fn new(batch_interval_ms: i64, config: &BackpressureConfig) -> Self {
        Self {
            batch_interval_ms,
            kp: config.proportional,
            ki: config.integral,
            kd: config.derivative,
            min_rate: config.min_rate,
            first_run: true,
            latest_time_ms: -1,
            latest_rate: -1.0,
            latest_error: -1.0,
        }
    }

    /// Feeds one completed batch; returns the new rate in records/s, or `None` when there is
    /// nothing to say (first run, no records, zero processing delay, or an old batch).
    pub fn compute(
        &mut self,
        time_ms: i64,
        num_records: u64,
        processing_delay_ms: i64,
        scheduling_delay_ms: i64,
    ) -> Option<f64> {
        if !(time_ms > self.latest_time_ms && num_records > 0 && processing_delay_ms > 0) {
            return None;
        }
        let delay_since_update = (time_ms - self.latest_time_ms) as f64 / 1000.0;
        let processing_rate = num_records as f64 / processing_delay_ms as f64 * 1000.0;
        let error = self.latest_rate - processing_rate;
        let historical_error = scheduling_delay_ms as f64 * processing_rate / self.batch_interval_ms as f64;
        let d_error = (error - self.latest_error) / delay_since_update;
        let new_rate =
            (self.latest_rate - self.kp * error - self.ki * historical_error - self.kd * d_error).max(self.min_rate);
        self.latest_time_ms = time_ms;
        if self.first_run {
            self.latest_rate = processing_rate;
            self.latest_error = 0.0;
            self.first_run = false;
            None
        } else {
            self.latest_rate = new_rate;
            self.latest_error = error;
            Some(new_rate)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_slow_batch_lowers_the_rate_towards_the_processing_rate() {
        let mut pid = PidRateEstimator::new(1_000, &BackpressureConfig::default());
        assert_eq!(pid.compute(1_000, 10_000, 500, 0), None); // the first call seeds
        // 10k records took 2 s to process: the processing rate is 5k/s, so the rate drops towards it.
        let rate = pid.compute(2_000, 10_000, 2_000, 0).unwrap();
        assert!((100.0..20_000.0).contains(&rate));
    }

    #[test]
    fn matches_sparks_formula() {
        let mut pid = PidRateEstimator::new(1000, &BackpressureConfig::default());
        assert_eq!(pid.compute(1000, 1000, 100, 0), None);
        // latest_rate = 10_000/s seeded. Now 1000 records in 200 ms = 5000/s, 100 ms scheduling.
        let rate = pid.compute(2000, 1000, 200, 100).unwrap();
        let error = 10_000.0 - 5000.0;
        let historical = 100.0 * 5000.0 / 1000.0;
        let expected = 10_000.0 - error - 0.2 * historical;
        assert!((rate - expected).abs() < 1e-9, "{rate} vs {expected}");
    }

    #[test]
    fn never_below_min_rate_and_ignores_empty_or_old_batches() {
        let mut pid = PidRateEstimator::new(1000, &BackpressureConfig::default());
        assert_eq!(pid.compute(1000, 0, 100, 0), None);
        assert_eq!(pid.compute(1000, 10, 0, 0), None);
        pid.compute(1000, 10, 10_000, 0);
        let rate = pid.compute(2000, 10, 10_000, 100_000).unwrap();
        assert!((rate - crate::config::DEFAULT_MIN_RATE).abs() < f64::EPSILON);
        assert_eq!(pid.compute(1500, 10, 100, 0), None);
    }

    #[test]
    fn validate_rejects_bad_gains() {
        let bad = BackpressureConfig {
            min_rate: 0.0,
            ..BackpressureConfig::default()
        };
        assert!(bad.validate().is_err());
        let bad = BackpressureConfig {
            integral: -1.0,
            ..BackpressureConfig::default()
        };
        assert!(bad.validate().is_err());
        assert!(BackpressureConfig::default().validate().is_ok());
    }
}
