//! Reading a router's Prometheus metrics.

/// The text of `GET {url}/metrics`.
pub async fn scrape(url: &str) -> String {
    reqwest::get(format!("{url}/metrics")).await.expect("GET /metrics").text().await.expect("metrics text")
}

/// The value of the sample `name{labels}` (labels in any order, all of them
/// matched), or 0 when the series does not exist yet (counters start absent).
pub fn sample(text: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    text.lines()
        .filter(|line| !line.starts_with('#'))
        .filter_map(|line| {
            let (series, value) = line.rsplit_once(' ')?;
            let (series_name, series_labels) = match series.split_once('{') {
                Some((n, l)) => (n, l.trim_end_matches('}')),
                None => (series, ""),
            };
            let matches = series_name == name
                && labels.iter().all(|(k, v)| series_labels.split(',').any(|kv| kv == format!("{k}=\"{v}\"")));
            matches.then(|| value.parse().ok()).flatten()
        })
        .next()
        .unwrap_or(0.0)
}

/// `sample` over a fresh scrape.
pub async fn value(url: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    sample(&scrape(url).await, name, labels)
}
