//! The moving average of a plug's power: time-weighted over the readings actually received in
//! the window. Each reading counts for the time until the next one, but never for more than
//! `max_hold`, so a gap in polling neither drags the average to zero nor stretches the value
//! read before it.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

pub struct MovingAverage {
    window: Duration,
    max_hold: Duration,
    samples: VecDeque<(Instant, f64)>,
}

impl MovingAverage {
    pub fn new(window: Duration, max_hold: Duration) -> MovingAverage {
        MovingAverage {
            window,
            max_hold,
            samples: VecDeque::new(),
        }
    }

    pub fn add(&mut self, at: Instant, value: f64) {
        self.samples.push_back((at, value));
    }

    /// The average and the number of readings it covers, as of `now`; `None` without readings.
    pub fn average(&mut self, now: Instant) -> Option<(f64, usize)> {
        let start = now.checked_sub(self.window).unwrap_or(now);
        while self.samples.front().is_some_and(|(t, _)| *t < start) {
            self.samples.pop_front();
        }
        let mut sum = 0.0;
        let mut weight = 0.0;
        for (i, (t, v)) in self.samples.iter().enumerate() {
            let until = self.samples.get(i + 1).map_or(now, |(n, _)| *n);
            let w = until.saturating_duration_since(*t).min(self.max_hold).as_secs_f64();
            sum += v * w;
            weight += w;
        }
        match (self.samples.len(), weight > 0.0) {
            (0, _) => None,
            (n, true) => Some((sum / weight, n)),
            // Readings all at `now`: their plain mean.
            (n, false) => Some((self.samples.iter().map(|(_, v)| v).sum::<f64>() / n as f64, n)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const S: Duration = Duration::from_secs(1);

    #[test]
    fn a_known_sequence() {
        let t0 = Instant::now();
        let mut a = MovingAverage::new(60 * S, 2 * S);
        // 10 W for 30 s, then 40 W for 30 s, read every second.
        for i in 0..60 {
            a.add(t0 + i * S, if i < 30 { 10.0 } else { 40.0 });
        }
        let (avg, n) = a.average(t0 + 60 * S).unwrap();
        assert_eq!(n, 60);
        assert!((avg - 25.0).abs() < 1e-9, "{avg}");
    }

    #[test]
    fn gaps_are_not_zeros() {
        let t0 = Instant::now();
        let mut a = MovingAverage::new(60 * S, 2 * S);
        for i in 0..10 {
            a.add(t0 + i * S, 100.0);
        }
        // 40 s without readings, then 10 more.
        for i in 50..60 {
            a.add(t0 + i * S, 100.0);
        }
        assert_eq!(a.average(t0 + 60 * S).unwrap(), (100.0, 20));
        // The window slides: old readings leave.
        let (_, n) = a.average(t0 + 115 * S).unwrap();
        assert_eq!(n, 5);
    }

    proptest! {
        // The average stays within the readings' range, and a constant reads as itself.
        #[test]
        fn bounded_by_the_readings(vals in prop::collection::vec((0u64..3000, 0.0f64..5000.0), 1..100)) {
            let t0 = Instant::now();
            let mut a = MovingAverage::new(60 * S, 2 * S);
            let mut at = t0;
            for (gap, v) in &vals {
                at += Duration::from_millis(*gap);
                a.add(at, *v);
            }
            let (avg, _) = a.average(at + S).unwrap();
            let in_window: Vec<f64> = vals.iter().map(|x| x.1).collect();
            let lo = in_window.iter().cloned().fold(f64::MAX, f64::min);
            let hi = in_window.iter().cloned().fold(f64::MIN, f64::max);
            prop_assert!(avg >= lo - 1e-9 && avg <= hi + 1e-9);
        }
    }
}
