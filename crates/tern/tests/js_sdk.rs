//! The TypeScript SDK (`sdk/js`) against this `tern` binary: its Node tests (TCP and
//! WebSocket, a publishing process killed with SIGKILL and its outbox file finishing the
//! flows, the broker killed mid-stream, Receive Maximum respected, Mosquitto as well) and
//! its browser tests (headless Chromium with puppeteer-core: ws:// and wss://, 1,000 QoS 2
//! at once, a reload in the middle of QoS 2 flows, the broker killed, offline mode). The
//! tests themselves are `sdk/js/test/*.test.mjs` (`node --test`); `scripts/test` installs
//! and builds the SDK first.

// A failed unwrap in a test is a failed test, with the value in the message.
#![allow(clippy::unwrap_used)]

use std::process::Command;

fn node_test(file: &str) {
    let sdk = concat!(env!("CARGO_MANIFEST_DIR"), "/../../sdk/js");
    assert!(
        std::path::Path::new(sdk).join("dist/index.js").exists(),
        "sdk/js is not built: scripts/test runs `npm ci && npm run build` there"
    );
    // A test that hangs fails on its own timeout (120 s, in the file); --test-force-exit
    // ends the run even if one left a socket open, and `timeout` bounds the whole of it.
    let out = Command::new("timeout")
        .args([
            "900",
            "node",
            "--test",
            "--test-force-exit",
            "--test-reporter=spec",
            file,
        ])
        .current_dir(sdk)
        .env("TERN_BIN", env!("CARGO_BIN_EXE_tern"))
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    println!("{stdout}");
    assert!(
        out.status.success(),
        "node --test {file}: {}\n{stdout}\n{stderr}",
        out.status
    );
    assert!(stdout.contains("fail 0"), "{stdout}");
}

#[test]
fn the_sdk_in_node_against_tern_and_mosquitto() {
    node_test("test/node.test.mjs");
}

#[test]
fn the_sdk_in_headless_chromium_over_ws_and_wss() {
    node_test("test/browser.test.mjs");
}
