//! The enforcer's `Config::parse` on arbitrary TOML text: it must never panic, and a config it
//! accepts must resolve and survive printing (`--check-config`) and reading back unchanged.
#![no_main]

use enforcer::config::Config;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|input: &[u8]| {
    let Ok(text) = std::str::from_utf8(input) else {
        return;
    };
    let Ok(cfg) = Config::parse(text) else {
        return;
    };
    let _ = cfg.admin_addr();
    let _ = cfg.resolved_providers();
    let _ = cfg.ledger_budgets();
    let _ = cfg.session_cap();
    let _ = cfg.effective_toml();
    let printed = toml::to_string(&cfg).expect("a parsed config prints as TOML");
    let reread = Config::parse(&printed).expect("a printed config parses again");
    assert_eq!(cfg, reread, "a config changed through print and parse");
});
