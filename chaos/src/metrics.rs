//! Reading a node's Prometheus text exposition (`/metrics`).

/// Sums the samples of metric `name` (all label sets) in a Prometheus text exposition. `None` when
/// the metric has no sample.
pub fn sum_metric(exposition: &str, name: &str) -> Option<f64> {
    let mut total = None;
    for line in exposition.lines() {
        if line.starts_with('#') {
            continue;
        }
        let Some(rest) = line.strip_prefix(name) else { continue };
        let value = if rest.starts_with('{') {
            match rest.rfind('}') {
                Some(end) => rest[end + 1..].split_whitespace().next(),
                None => continue,
            }
        } else if rest.starts_with(' ') {
            rest.split_whitespace().next()
        } else {
            // Another metric whose name starts with `name` (`name_total`, `name_bucket`, ...).
            continue;
        };
        if let Some(v) = value.and_then(|v| v.parse::<f64>().ok()) {
            *total.get_or_insert(0.0) += v;
        }
    }
    total
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metrics_are_summed_over_labels() {
        let text = "# HELP convoy_requests_total requests\n\
                    # TYPE convoy_requests_total counter\n\
                    convoy_requests_total{op=\"ping\",code=\"ok\"} 3\n\
                    convoy_requests_total{op=\"msg.send\",code=\"ok\"} 4.5\n\
                    convoy_requests_total_extra 100\n\
                    convoy_connections 2\n";
        assert_eq!(sum_metric(text, "convoy_requests_total"), Some(7.5));
        assert_eq!(sum_metric(text, "convoy_connections"), Some(2.0));
        assert_eq!(sum_metric(text, "convoy_missing"), None);
    }
}
