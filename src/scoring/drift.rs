//! Score drift: has the distribution of scores of good parts moved away from the one the
//! threshold was calibrated on? Two-sample Kolmogorov–Smirnov statistic (the largest gap
//! between the two empirical distribution functions) and its large-sample critical value.
//! Written by hand: a sorted merge, a few lines, no statistics crate needed.

/// The two-sample Kolmogorov–Smirnov statistic D of two samples, each sorted ascending.
/// 0 for identical distributions, 1 for samples that do not overlap; `None` if either is empty.
pub fn ks_statistic(a: &[f32], b: &[f32]) -> Option<f64> {
    if a.is_empty() || b.is_empty() {
        return None;
    }
    let (n, m) = (a.len() as f64, b.len() as f64);
    let (mut i, mut j, mut d) = (0usize, 0usize, 0f64);
    while i < a.len() && j < b.len() {
        // Step both distribution functions past the next value (ties move together).
        let x = a[i].min(b[j]);
        while i < a.len() && a[i] <= x {
            i += 1;
        }
        while j < b.len() && b[j] <= x {
            j += 1;
        }
        d = d.max((i as f64 / n - j as f64 / m).abs());
    }
    Some(d)
}

/// The D above which two samples of sizes `n` and `m` differ at significance `alpha`
/// (asymptotic: c(α)·√((n + m)/(n·m)), c(α) = √(−ln(α/2)/2); 1.628 for α = 0.01).
pub fn ks_critical(n: usize, m: usize, alpha: f64) -> f64 {
    let c = (-(alpha / 2.0).ln() / 2.0).sqrt();
    c * ((n + m) as f64 / (n * m) as f64).sqrt()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ks_statistic_by_hand() {
        // F_a and F_b at 2: 0.5 vs 0; at 3: 0.75 vs 0.2; at 4: 1 vs 0.4 → D = 0.6
        // (scipy.stats.ks_2samp([1,2,3,4], [3,4,5,6,7]).statistic is 0.6 too).
        let d = ks_statistic(&[1.0, 2.0, 3.0, 4.0], &[3.0, 4.0, 5.0, 6.0, 7.0]).unwrap();
        assert!((d - 0.6).abs() < 1e-12, "{d}");
        // Ties step together: at 1, 2/3 vs 1/3; at 2, 1 vs 1 → D = 1/3.
        let d = ks_statistic(&[1.0, 1.0, 2.0], &[1.0, 2.0, 2.0]).unwrap();
        assert!((d - 1.0 / 3.0).abs() < 1e-12, "{d}");
        assert_eq!(ks_statistic(&[1.0, 2.0], &[1.0, 2.0]), Some(0.0));
        assert_eq!(ks_statistic(&[1.0, 2.0], &[3.0, 4.0, 5.0]), Some(1.0));
        assert_eq!(ks_statistic(&[], &[1.0]), None);
    }

    #[test]
    fn ks_critical_value_at_one_percent() {
        // c(0.01) = √(ln 200 / 2) = 1.62762; n = m = 100 → 1.62762 · √0.02 = 0.230180.
        assert!((ks_critical(100, 100, 0.01) - 0.230180).abs() < 1e-5);
        // Fewer samples need a larger gap.
        assert!(ks_critical(8, 100, 0.01) > ks_critical(100, 100, 0.01));
    }
}
