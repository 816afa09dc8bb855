//! `/metrics` in the format the scraper asks for. The data plane writes OpenMetrics (the only
//! format `prometheus-client` writes); Prometheus's classic text format, which `promtool`, older
//! scrapers and most agents read, is the default and is derived here from it.

/// A format of the text exposition.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Exposition {
    /// Prometheus's text format 0.0.4.
    Classic,
    /// OpenMetrics 1.0.
    OpenMetrics,
}

impl Exposition {
    /// The format an `Accept` field asks for: OpenMetrics when it ranks it at least as high as
    /// the classic format (as Prometheus's own scrapes do), the classic format otherwise.
    pub(crate) fn negotiate(accept: &str) -> Self {
        let (mut open, mut classic) = (0.0f32, 0.0f32);
        for range in accept.split(',') {
            let mut params = range.split(';');
            let media = params.next().unwrap_or_default().trim();
            let q = params
                .filter_map(|p| p.split_once('='))
                .find(|(name, _)| name.trim().eq_ignore_ascii_case("q"))
                .map_or(Some(1.0), |(_, q)| q.trim().parse::<f32>().ok())
                .unwrap_or(0.0);
            if media.eq_ignore_ascii_case("application/openmetrics-text") {
                open = open.max(q);
            } else if media.eq_ignore_ascii_case("text/plain") {
                classic = classic.max(q);
            }
        }
        if open > 0.0 && open >= classic {
            Self::OpenMetrics
        } else {
            Self::Classic
        }
    }

    /// Its `Content-Type`.
    pub(crate) fn content_type(self) -> &'static str {
        match self {
            Self::Classic => "text/plain; version=0.0.4; charset=utf-8",
            Self::OpenMetrics => "application/openmetrics-text; version=1.0.0; charset=utf-8",
        }
    }

    /// `openmetrics`, the data plane's exposition, in this format.
    pub(crate) fn write(self, openmetrics: String) -> String {
        match self {
            Self::OpenMetrics => openmetrics,
            Self::Classic => classic(&openmetrics),
        }
    }
}

/// The classic text format of an OpenMetrics exposition. The samples are the same; the metadata
/// differs: a counter's `# HELP` and `# TYPE` name its `_total` sample, an info metric becomes a
/// gauge named by its `_info` sample, and `# UNIT` and `# EOF` go (the classic format has
/// neither). `prometheus-client` writes each family's `# HELP` before its `# TYPE`.
fn classic(openmetrics: &str) -> String {
    let mut out = String::with_capacity(openmetrics.len());
    let mut help: Option<(&str, &str)> = None;
    for line in openmetrics.lines() {
        if let Some(rest) = line.strip_prefix("# HELP ") {
            help = rest.split_once(' ').or(Some((rest, "")));
        } else if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').unwrap_or((rest, "untyped"));
            let (suffix, kind) = match kind {
                "counter" => ("_total", "counter"),
                "info" => ("_info", "gauge"),
                "stateset" => ("", "gauge"),
                "gaugehistogram" => ("", "histogram"),
                "unknown" => ("", "untyped"),
                other => ("", other),
            };
            if let Some((_, text)) = help.take() {
                out.push_str(&format!("# HELP {name}{suffix} {text}\n"));
            }
            out.push_str(&format!("# TYPE {name}{suffix} {kind}\n"));
        } else if !(line.starts_with("# UNIT ") || line == "# EOF") {
            out.push_str(line);
            out.push('\n');
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prometheus_gets_openmetrics_and_everyone_else_the_classic_format() {
        // What Prometheus 2.x sends.
        let prometheus = "application/openmetrics-text;version=1.0.0,application/openmetrics-text;version=0.0.1;q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1";
        assert_eq!(Exposition::negotiate(prometheus), Exposition::OpenMetrics);
        for classic in [
            "",
            "*/*",
            "text/plain",
            "text/plain;version=0.0.4",
            "text/plain, application/openmetrics-text;q=0.5",
            "application/openmetrics-text;q=0",
            "application/openmetrics-text;q=nonsense",
        ] {
            assert_eq!(
                Exposition::negotiate(classic),
                Exposition::Classic,
                "{classic}"
            );
        }
        assert_eq!(
            Exposition::negotiate("Application/OpenMetrics-Text; Q=0.9, text/plain; q=0.9"),
            Exposition::OpenMetrics
        );
    }

    #[test]
    fn the_classic_format_names_counters_and_infos_by_their_samples() {
        let open = "\
# HELP a_requests Requests.
# TYPE a_requests counter
a_requests_total{x=\"1\"} 3
# HELP a_build The build.
# TYPE a_build info
a_build_info{version=\"1\"} 1
# HELP a_duration_seconds Time.
# TYPE a_duration_seconds histogram
# UNIT a_duration_seconds seconds
a_duration_seconds_sum 0.5
a_duration_seconds_count 2
a_duration_seconds_bucket{le=\"+Inf\"} 2
# HELP a_open Open.
# TYPE a_open gauge
a_open 1
# EOF
";
        let classic = "\
# HELP a_requests_total Requests.
# TYPE a_requests_total counter
a_requests_total{x=\"1\"} 3
# HELP a_build_info The build.
# TYPE a_build_info gauge
a_build_info{version=\"1\"} 1
# HELP a_duration_seconds Time.
# TYPE a_duration_seconds histogram
a_duration_seconds_sum 0.5
a_duration_seconds_count 2
a_duration_seconds_bucket{le=\"+Inf\"} 2
# HELP a_open Open.
# TYPE a_open gauge
a_open 1
";
        assert_eq!(Exposition::Classic.write(open.to_owned()), classic);
        assert_eq!(Exposition::OpenMetrics.write(open.to_owned()), open);
    }
}
