//! The `ddpo` binary end to end: synth → init-model → validate, and its errors for bad configs and data.

use std::path::Path;
use std::process::{Command, Output};

use crate::common::*;

fn ddpo(args: &[&str]) -> Output {
    ddpo_cmd(args)
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

#[test]
fn synth_then_validate_passes() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let o = ddpo(&[
        "synth",
        "--out",
        s(&data),
        "--pairs",
        "40",
        "--shards",
        "2",
        "--seed",
        "3",
        "--rows-per-group",
        "8",
    ]);
    assert!(o.status.success(), "{}", text_of(&o));
    let model = dir.path().join("model");
    let o = ddpo(&["init-model", "--out", s(&model), "--preset", "tiny"]);
    assert!(o.status.success(), "{}", text_of(&o));
    let cfg = write_config(
        dir.path(),
        &model,
        &format!("{}/train-*.parquet", data.display()),
        "",
    );
    let o = ddpo(&["validate", "--config", s(&cfg)]);
    let out = text_of(&o);
    assert!(o.status.success(), "{out}");
    assert!(out.contains("40 rows: 40 ok, 0 bad"), "{out}");
    // stderr is a pipe here, as when logs go to a file: log lines, but no colour escape codes.
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("INFO"), "no log lines to check: {err}");
    assert!(
        !err.contains('\x1b'),
        "escape codes in redirected logs: {err:?}"
    );
    assert!(out.contains("RLHF-V layout"), "{out}");
    assert!(out.contains("validation passed"), "{out}");
}

#[test]
fn validate_names_config_typos_and_missing_files() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_model(dir.path());
    let cfg = write_config(
        dir.path(),
        &model,
        "nowhere/*.parquet",
        "[ddpo]\ngama = 2.0\n",
    );
    let o = ddpo(&["validate", "--config", s(&cfg)]);
    let out = text_of(&o);
    assert!(!o.status.success());
    assert!(
        out.contains("job.toml")
            && out.contains("unknown key `ddpo.gama`")
            && out.contains("did you mean `gamma`"),
        "{out}"
    );

    let cfg = write_config(dir.path(), &model, "nowhere/*.parquet", "");
    let o = ddpo(&["validate", "--config", s(&cfg)]);
    let out = text_of(&o);
    assert!(!o.status.success());
    assert!(
        out.contains("data.train: nowhere/*.parquet: the glob matches no file"),
        "{out}"
    );

    // Environment overrides are validated the same way.
    let o = Command::new(env!("CARGO_BIN_EXE_ddpo"))
        .args(["validate", "--config", s(&cfg)])
        .env("DDPO__DDPO__BETA", "-1")
        .output()
        .unwrap();
    let out = text_of(&o);
    assert!(!o.status.success());
    assert!(out.contains("ddpo.beta = -1: must be > 0"), "{out}");
}

#[test]
fn validate_reports_bad_rows_and_fails() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_model(dir.path());
    let mut rows: Vec<Row> = (0..6).map(good_row).collect();
    rows[4].text = Some("not json".into());
    write_rlhfv(&dir.path().join("bad.parquet"), &rows, 4);
    let cfg = write_config(
        dir.path(),
        &model,
        &format!("{}/*.parquet", dir.path().display()),
        "",
    );
    let o = ddpo(&["validate", "--config", s(&cfg)]);
    let out = text_of(&o);
    assert!(!o.status.success(), "{out}");
    assert!(out.contains("6 rows: 5 ok, 1 bad"), "{out}");
    assert!(
        out.contains("bad.parquet: row 4: `text` is not valid JSON"),
        "{out}"
    );
    assert!(out.contains("validation FAILED"), "{out}");
}
