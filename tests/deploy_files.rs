//! The deploy files stay true: the systemd unit passes `systemd-analyze verify`, and the
//! Dockerfile builds the binary with the recipe CI runs (`scripts/build.sh`), not a copy of it.

use std::path::{Path, PathBuf};
use std::process::Command;

use posthog_sim::serve::free_port;

const UNIT: &str = "config/insights-proxy.service";
const INSTALLED_BINARY: &str = "/usr/local/bin/insights-proxy";

fn read(path: &str) -> String {
    std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join(path)).unwrap()
}

/// `systemd-analyze verify` on `unit` (a file named insights-proxy.service in a temp dir): its
/// exit status and everything it printed. It exits 0 on unknown keys and bad values, and only
/// warns, so both count.
fn verify(unit: &str) -> (bool, String) {
    let dir = std::env::temp_dir().join(format!("ipx-unit-{}-{}", std::process::id(), free_port()));
    std::fs::create_dir_all(&dir).unwrap();
    let path: PathBuf = dir.join("insights-proxy.service");
    std::fs::write(&path, unit).unwrap();
    let out = Command::new("systemd-analyze").arg("verify").arg(&path).output().expect("systemd-analyze runs");
    let _ = std::fs::remove_dir_all(&dir);
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    (out.status.success(), text)
}

#[test]
fn the_systemd_unit_passes_systemd_analyze_verify() {
    if Command::new("systemd-analyze").arg("--version").output().is_err() {
        eprintln!("SKIPPED: systemd-analyze is not installed");
        return;
    }
    let unit = read(UNIT);
    assert!(unit.contains(&format!("ExecStart={INSTALLED_BINARY} ")), "the unit runs {INSTALLED_BINARY}");
    // verify also checks that ExecStart is executable: point it at the binary just built.
    let here = unit.replace(INSTALLED_BINARY, env!("CARGO_BIN_EXE_insights-proxy"));
    let (ok, text) = verify(&here);
    assert!(ok && text.trim().is_empty(), "systemd-analyze verify {UNIT}:\n{text}");
    // The same check notices a key systemd does not know.
    let (_, text) = verify(&here.replace("[Service]\n", "[Service]\nRestartEverySoOften=yes\n"));
    assert!(text.contains("RestartEverySoOften"), "a wrong key goes unnoticed:\n{text}");
}

/// The instructions of the Dockerfile stage named `stage`, continuation lines joined.
fn stage(dockerfile: &str, stage: &str) -> Vec<String> {
    let joined = dockerfile.replace("\\\n", " ");
    let mut lines = joined.lines().map(str::trim).filter(|l| !l.is_empty() && !l.starts_with('#'));
    let header = |l: &str| l.starts_with("FROM ") && l.ends_with(&format!(" AS {stage}"));
    lines.by_ref().find(|l| header(l)).unwrap_or_else(|| panic!("no stage {stage}"));
    lines.take_while(|l| !l.starts_with("FROM ")).map(str::to_string).collect()
}

#[test]
fn the_docker_image_is_built_by_the_script_ci_builds_with() {
    let dockerfile = read("Dockerfile");
    let runs: Vec<_> = stage(&dockerfile, "build").into_iter().filter(|l| l.starts_with("RUN ")).collect();
    assert_eq!(runs, ["RUN scripts/build.sh --release"], "the build stage runs the CI build script, and only it");
    let copied = format!("COPY --from=build /src/target/release/insights-proxy {INSTALLED_BINARY}");
    assert!(dockerfile.lines().any(|l| l == copied), "the image holds what the release build made");

    let ci = read(".ci/run");
    assert!(ci.lines().any(|l| l == "scripts/build.sh"), ".ci/run builds with scripts/build.sh");
    assert!(ci.lines().any(|l| l == "bash scripts/setup.sh"), ".ci/run installs with scripts/setup.sh");
    let build = read("scripts/build.sh");
    let steps: Vec<_> = build.lines().filter(|l| !l.starts_with('#') && !l.trim().is_empty()).collect();
    assert_eq!(
        steps,
        [
            "set -euo pipefail",
            "cd \"$(dirname \"$0\")/..\"",
            "bash scripts/setup.sh build",
            "cargo build --locked --bin insights-proxy \"$@\"",
        ],
        "scripts/build.sh is the one build recipe"
    );
}
