//! Golden tests of the build stage: each `fixtures/NAME.yaml` gateway must build exactly the
//! objects in `golden/NAME.yaml`. After an intended change, regenerate with
//! `UPDATE_GOLDEN=1 cargo test -p wsrelay-operator --test golden` and review the diff.

use std::path::{Path, PathBuf};

use wsrelay_operator::api::WebsocketGateway;
use wsrelay_operator::build::build;

fn dir(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests")
        .join(name)
}

#[test]
fn fixtures_build_their_golden_objects() {
    let update = std::env::var_os("UPDATE_GOLDEN").is_some();
    let mut fixtures: Vec<PathBuf> = std::fs::read_dir(dir("fixtures"))
        .expect("fixtures directory")
        .map(|e| e.expect("directory entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    fixtures.sort();
    assert!(!fixtures.is_empty(), "no fixtures found");
    let mut stale = Vec::new();
    for fixture in fixtures {
        let text = std::fs::read_to_string(&fixture).expect("read fixture");
        let gw: WebsocketGateway =
            serde_yaml::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", fixture.display()));
        let desired = build(&gw).unwrap_or_else(|e| panic!("{}: {e}", fixture.display()));
        let got = desired.to_yaml().expect("serialises");
        let golden = dir("golden").join(fixture.file_name().expect("file name"));
        if update {
            std::fs::write(&golden, &got).expect("write golden file");
            continue;
        }
        let want = std::fs::read_to_string(&golden).unwrap_or_default();
        if want != got {
            stale.push(golden.display().to_string());
        }
    }
    assert!(
        stale.is_empty(),
        "built objects differ from the golden files {stale:?}; if the change is intended, run \
         `UPDATE_GOLDEN=1 cargo test -p wsrelay-operator --test golden` and review the diff"
    );
}
