//! Small statistics for tests and benchmarks.

/// Pearson's chi-square statistic of `observed` counts against a uniform spread.
pub fn chi_square_uniform(observed: &[u64]) -> f64 {
    let total: u64 = observed.iter().sum();
    let expected = total as f64 / observed.len() as f64;
    observed
        .iter()
        .map(|&o| (o as f64 - expected).powi(2) / expected)
        .sum()
}

/// Critical values of chi-square at p = 0.001, by degrees of freedom (1..=10): a fair spread
/// exceeds them once in a thousand runs.
pub const CHI_SQUARE_P001: [f64; 10] = [
    10.828, 13.816, 16.266, 18.467, 20.515, 22.458, 24.322, 26.124, 27.877, 29.588,
];

/// The `q` quantile (0..=1) of `samples`, which it sorts.
pub fn quantile(samples: &mut [f64], q: f64) -> f64 {
    if samples.is_empty() {
        return f64::NAN;
    }
    samples.sort_by(|a, b| a.total_cmp(b));
    let rank = ((samples.len() - 1) as f64 * q).round() as usize;
    samples[rank]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chi_square_is_zero_for_a_perfect_spread_and_large_for_a_skewed_one() {
        assert_eq!(chi_square_uniform(&[100, 100, 100]), 0.0);
        assert!(chi_square_uniform(&[300, 0, 0]) > CHI_SQUARE_P001[1]);
    }

    #[test]
    fn quantiles_pick_ranks() {
        let mut v = vec![5.0, 1.0, 3.0, 2.0, 4.0];
        assert_eq!(quantile(&mut v, 0.5), 3.0);
        assert_eq!(quantile(&mut v, 1.0), 5.0);
    }
}
