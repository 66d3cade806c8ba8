use std::io::Read;
use std::process::{Command, Stdio};

use crate::util::HANG;

/// Runs `courtside serve ARGS` with `env` set, which must exit by itself (a configuration
/// error), within HANG; returns its exit code and what it wrote on standard error.
fn refused(args: &[&str], env: &[(&str, &str)]) -> (Option<i32>, String) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_courtside"))
        .arg("serve")
        .args(args)
        .envs(env.iter().copied())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start courtside");
    let mut stderr = child.stderr.take().expect("stderr");
    // Standard error ends when the process exits: its end is the exit, awaited with a bound.
    let (done, ended) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut text = String::new();
        let _ = stderr.read_to_string(&mut text);
        let _ = done.send(text);
    });
    let Ok(text) = ended.recv_timeout(HANG) else {
        let _ = child.kill();
        let _ = child.wait();
        panic!("courtside serve {args:?} did not exit: it accepted the configuration");
    };
    let status = child.wait().expect("wait");
    (status.code(), text)
}

#[test]
fn a_bad_variable_is_named_as_the_variable_with_what_it_takes() {
    let (code, stderr) = refused(&["--http", "127.0.0.1:0", "--no-wt"], &[("COURTSIDE_MAX_BODY", "1MB")]);
    assert_eq!(code, Some(2), "{stderr}");
    assert_eq!(
        stderr.trim(),
        "courtside: COURTSIDE_MAX_BODY=\"1MB\": takes a whole number of bytes, such as 1048576 (invalid digit found in string)"
    );
}

#[test]
fn a_zero_variable_is_named_as_the_variable() {
    let (code, stderr) = refused(
        &["--http", "127.0.0.1:0", "--no-wt"],
        &[("COURTSIDE_IDLE_TIMEOUT", "0s")],
    );
    assert_eq!(code, Some(2), "{stderr}");
    assert_eq!(
        stderr.trim(),
        "courtside: COURTSIDE_IDLE_TIMEOUT must be greater than 0 (a duration such as 10s)"
    );
}

#[test]
fn a_missing_certificate_fails_before_anything_listens() {
    let (code, stderr) = refused(
        &[
            "--http",
            "127.0.0.1:0",
            "--wt",
            "127.0.0.1:0",
            "--publish-token",
            "t",
            "--cert",
            "/nonexistent/cert.pem",
        ],
        &[("COURTSIDE_KEY", "/nonexistent/key.pem")],
    );
    assert_eq!(code, Some(1), "{stderr}");
    assert!(
        stderr.contains("--cert /nonexistent/cert.pem and COURTSIDE_KEY /nonexistent/key.pem: cannot load the WebTransport certificate"),
        "{stderr}"
    );
    assert!(!stderr.contains("listening"), "it listened before the check: {stderr}");
}

#[test]
fn a_redis_url_of_another_scheme_is_refused_before_anything_listens() {
    let (code, stderr) = refused(
        &["--http", "127.0.0.1:0", "--no-wt"],
        &[("COURTSIDE_REDIS", "http://localhost:6379")],
    );
    assert_eq!(code, Some(2), "{stderr}");
    assert!(
        stderr.starts_with("courtside: COURTSIDE_REDIS has the scheme http://"),
        "{stderr}"
    );
    assert!(stderr.contains("redis://") && stderr.contains("rediss://"), "{stderr}");
}

#[test]
fn a_bad_log_filter_is_named_as_given() {
    let (code, stderr) = refused(
        &["--http", "127.0.0.1:0", "--no-wt"],
        &[("COURTSIDE_LOG", "info,x=lots")],
    );
    assert_eq!(code, Some(2), "{stderr}");
    assert!(
        stderr.starts_with("courtside: COURTSIDE_LOG=\"info,x=lots\": takes a level (info) or directives"),
        "{stderr}"
    );
}
