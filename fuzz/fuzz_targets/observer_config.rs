//! The observer's `Config::parse` on arbitrary TOML text: it must never panic, and a config it
//! accepts must print (`check-config`) and read back unchanged.
#![no_main]

use libfuzzer_sys::fuzz_target;
use observer::config::Config;

fuzz_target!(|input: &[u8]| {
    let Ok(text) = std::str::from_utf8(input) else {
        return;
    };
    let Ok(cfg) = Config::parse(text) else {
        return;
    };
    let printed = toml::to_string_pretty(&cfg).expect("a parsed config prints as TOML");
    let reread = Config::parse(&printed).expect("a printed config parses again");
    assert_eq!(cfg, reread, "a config changed through print and parse");
});
