//! A short run of every fuzz target (the long runs are `glassbox-fuzz run all --seconds N`).

#[test]
fn every_target_survives_a_short_run() {
    for t in glassbox_fuzz::TARGETS {
        // Every seed is valid input; mutations must never panic.
        match glassbox_fuzz::fuzz(t, 1, 400, None) {
            Ok(n) => assert_eq!(n, 400),
            Err((input, msg)) => panic!("{}: input of {} bytes panicked: {msg}", t.name(), input.len()),
        }
    }
}
