//! Arbitrary text through `ServerConfig::from_toml`: never panics, and whatever parses
//! passes `validate` and names a valid fsync policy. Non-UTF-8 inputs are read lossily.
#![no_main]

use libfuzzer_sys::fuzz_target;
use rill_server::config::ServerConfig;

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    if let Ok(config) = ServerConfig::from_toml(&text) {
        assert!(config.validate().is_ok(), "from_toml returned an invalid config: {config:?}");
        assert!(config.topic_defaults.fsync_policy().is_ok());
    }
});
