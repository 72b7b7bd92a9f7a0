//! Helpers shared by the client's integration tests.
#![allow(dead_code)] // each test binary uses its own part

use std::time::Duration;

use upstream_client::{UpstreamClient, UpstreamSettings};

/// Settings for `base` with short timeouts (2 s connect, 5 s total).
pub fn settings(base: &str) -> UpstreamSettings {
    let mut s = UpstreamSettings::new("test", base.parse().unwrap());
    s.connect_timeout = Duration::from_secs(2);
    s.timeout = Duration::from_secs(5);
    s
}

/// A client with [`settings`].
pub fn client(base: &str) -> UpstreamClient {
    UpstreamClient::new(settings(base)).unwrap()
}

/// Header pairs as the client's requests carry them.
pub fn owned(list: &[(&str, &str)]) -> Vec<(String, String)> {
    list.iter()
        .map(|(n, v)| ((*n).to_owned(), (*v).to_owned()))
        .collect()
}
