//! The fault suite: each test simulates one thing a user, a disk or a process does wrong and
//! checks that nothing is lost and the error says what to do. Named after what it simulates.

use std::path::Path;

use crate::common::{PipelineToml, Project};

/// Every file under `dir`, relative, sorted.
fn files_under(dir: &Path) -> Vec<String> {
    fn walk(dir: &Path, prefix: &str, out: &mut Vec<String>) {
        for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
            let name = format!("{prefix}{}", e.file_name().to_string_lossy());
            if e.path().is_dir() {
                walk(&e.path(), &format!("{name}/"), out);
            } else {
                out.push(name);
            }
        }
    }
    let mut out = Vec::new();
    walk(dir, "", &mut out);
    out.sort();
    out
}

/// A project with a user's `important/thesis.txt` beside `outputs/`.
fn project_beside_important_folder() -> Project {
    let p = Project::new(PipelineToml::basic());
    let important = p.path("important");
    std::fs::create_dir_all(&important).unwrap();
    std::fs::write(important.join("thesis.txt"), "four years of work").unwrap();
    p
}

#[test]
fn pipeline_name_with_dotdot_cannot_replace_a_sibling_folder() {
    // `name = ".."` puts outputs/<name>/ at the project root; a stage named like a sibling
    // folder used to rename that folder aside and delete it.
    let p = project_beside_important_folder();
    p.write_pipeline(
        PipelineToml::basic()
            .set("pipeline.name", "..")
            .remove("stage.preprocess")
            .stage("important", "preprocess", &["caption"])
            .set("stage.important.resolution", 32),
    );
    let run = p.sdpipe(&["run", "p.toml"]);
    assert_eq!(run.code, 2, "{}{}", run.stdout, run.stderr);
    assert!(run.stderr.contains("p.toml:2:"), "{}", run.stderr);
    assert!(run.stderr.contains("pipeline name"), "{}", run.stderr);
    assert_eq!(
        std::fs::read_to_string(p.path("important/thesis.txt")).unwrap(),
        "four years of work"
    );
    assert!(!p.path("outputs").exists(), "nothing was written");
}

#[test]
fn pipeline_name_escaping_outputs_is_refused_at_its_key() {
    let p = Project::new(PipelineToml::basic());
    let outside = tempfile::tempdir().unwrap();
    let absolute = outside.path().join("x");
    for name in ["../x", "a/b", ".hidden", absolute.to_str().unwrap()] {
        p.write_pipeline(PipelineToml::basic().set("pipeline.name", name));
        for command in ["run", "plan"] {
            let run = p.sdpipe(&[command, "p.toml"]);
            assert_eq!(run.code, 2, "{name}: {}{}", run.stdout, run.stderr);
            assert!(run.stderr.contains("p.toml:2:1"), "{name}: {}", run.stderr);
            assert!(run.stderr.contains("letters, digits"), "{}", run.stderr);
        }
    }
    assert!(!p.path("x").exists());
    assert!(!absolute.exists());
    assert!(files_under(outside.path()).is_empty());
    assert!(!p.path("outputs").exists());
}

#[test]
fn matrix_value_with_a_path_stays_inside_its_stage_folder() {
    // `matrix.template = ["a/../../x"]` used to write a manifest outside outputs/.
    let p = Project::new(
        PipelineToml::basic()
            .remove("stage.preprocess")
            .remove("stage.caption.template")
            .set(
                "stage.caption.matrix.template",
                vec!["a/../../x {token}", "/tmp/y {token}"],
            ),
    );
    let before = files_under(p.dir.path());
    let run = p.sdpipe(&["run", "p.toml"]);
    assert_eq!(run.code, 0, "{}{}", run.stdout, run.stderr);
    let after = files_under(p.dir.path());
    let new: Vec<&String> = after
        .iter()
        .filter(|f| !before.contains(f))
        .filter(|f| !f.starts_with(".sdpipe/") && !f.starts_with("outputs/t/"))
        .collect();
    assert!(new.is_empty(), "written outside outputs/t: {new:?}");
    let folders: Vec<String> = std::fs::read_dir(p.path("outputs/t"))
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("caption@"))
        .collect();
    assert_eq!(folders.len(), 2, "{folders:?}");
    assert!(
        folders.contains(&"caption@template=a%2F..%2F..%2Fx {token}".to_string()),
        "{folders:?}"
    );
    assert!(
        p.path("outputs/t/caption@template=%2Ftmp%2Fy {token}/manifest.json")
            .is_file()
    );
}

#[test]
fn stage_folder_holding_user_files_is_not_replaced() {
    let p = Project::new(PipelineToml::basic());
    let folder = p.path("outputs/t/caption");
    std::fs::create_dir_all(&folder).unwrap();
    std::fs::write(folder.join("notes.txt"), "mine").unwrap();
    let run = p.sdpipe(&["run", "p.toml"]);
    assert_eq!(run.code, 3, "{}{}", run.stdout, run.stderr);
    let all = format!("{}{}", run.stdout, run.stderr);
    assert!(all.contains("notes.txt"), "{all}");
    assert!(all.contains("did not write"), "{all}");
    assert_eq!(
        std::fs::read_to_string(folder.join("notes.txt")).unwrap(),
        "mine"
    );

    // Moved away, the run publishes; a changed stage then replaces its own folder.
    std::fs::remove_file(folder.join("notes.txt")).unwrap();
    let run = p.sdpipe(&["run", "p.toml"]);
    assert_eq!(run.code, 0, "{}{}", run.stdout, run.stderr);
    p.write_pipeline(PipelineToml::basic().set("stage.caption.token", "blip"));
    let run = p.sdpipe(&["run", "p.toml"]);
    assert_eq!(run.code, 0, "{}{}", run.stdout, run.stderr);
    let manifest = std::fs::read_to_string(folder.join("manifest.json")).unwrap();
    assert!(manifest.contains("blip"), "{manifest}");

    // A file dropped into a published folder is kept too: the next publish refuses.
    std::fs::write(folder.join("notes.txt"), "mine again").unwrap();
    p.write_pipeline(PipelineToml::basic().set("stage.caption.token", "zap"));
    let run = p.sdpipe(&["run", "p.toml"]);
    assert_eq!(run.code, 3, "{}{}", run.stdout, run.stderr);
    assert_eq!(
        std::fs::read_to_string(folder.join("notes.txt")).unwrap(),
        "mine again"
    );
}

#[test]
fn sigterm_from_a_scheduler_stops_like_ctrl_c() {
    // Slurm, systemd and `docker stop` send SIGTERM: the run stops at its next check, prints
    // its summary and exits 130, keeping what finished.
    let p = Project::new(PipelineToml::basic());
    let child = p.spawn(
        &["run", "p.toml"],
        &[
            ("SDPIPE_TEST_ITEM_DELAY_MS", "300"),
            ("RAYON_NUM_THREADS", "1"),
        ],
    );
    let items = p.path(".sdpipe/cache-v1/records/items");
    crate::common::wait_for("the first preprocessed item", || {
        crate::common::count_files(&items) >= 1
    });
    let status = std::process::Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let out = child.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        out.status.code(),
        Some(130),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("cancelled"),
        "a summary is printed: {stdout}"
    );
    assert_eq!(p.outcome("preprocess"), "cancelled");
    assert_eq!(p.sdpipe(&["cache", "verify"]).code, 0);
    let run = p.sdpipe(&["run", "p.toml"]);
    assert_eq!(run.code, 0, "{}{}", run.stdout, run.stderr);
    assert!(p.stats("preprocess")["images_reused"].as_u64().unwrap() >= 1);
}

#[test]
fn stdout_closed_by_head_ends_quietly() {
    // `sdpipe plan --json | head -c 1`: the reader goes away after one byte.
    let p = Project::new(PipelineToml::basic());
    let mut child = p
        .command(&["plan", "--json", "p.toml"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    drop(child.stdout.take()); // close the pipe before sdpipe writes
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert!(
        stderr.trim().is_empty(),
        "no message for a closed pipe: {stderr}"
    );
}

#[test]
fn stdout_on_a_full_disk_is_an_environment_error() {
    let full = Path::new("/dev/full");
    if !full.exists() {
        return; // Linux has it; elsewhere there is no full device to write to
    }
    let p = Project::new(PipelineToml::basic());
    assert_eq!(p.sdpipe(&["run", "p.toml"]).code, 0);
    let out = p
        .command(&["cache", "verify"])
        .stdout(std::fs::File::create(full).unwrap())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(3), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert!(stderr.contains("writing to standard output"), "{stderr}");
}

/// A 48 KiB tmpfs, or `None` where this process may not mount one (not root): the full-disk
/// test then has nothing to run on, and `control::error_chain`'s unit tests still cover the
/// classification.
struct TinyDisk(tempfile::TempDir);

impl TinyDisk {
    fn mount() -> Option<TinyDisk> {
        let dir = tempfile::tempdir().ok()?;
        let ok = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", "size=48k", "tmpfs"])
            .arg(dir.path())
            .stderr(std::process::Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        ok.then_some(TinyDisk(dir))
    }
}

impl Drop for TinyDisk {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg(self.0.path())
            .status();
    }
}

#[test]
fn full_disk_during_a_stage_is_exit_3_and_names_the_path_once() {
    let Some(disk) = TinyDisk::mount() else {
        eprintln!("skipped: cannot mount a tmpfs here (needs root)");
        return;
    };
    let p = Project::new(PipelineToml::basic());
    let cache = disk.0.path().join("cache");
    let run = p.sdpipe(&["--cache-dir", cache.to_str().unwrap(), "run", "p.toml"]);
    assert_eq!(run.code, 3, "{}{}", run.stdout, run.stderr);
    assert!(
        run.stdout.contains("No space left") && run.stdout.contains("make room"),
        "{}",
        run.stdout
    );
    let error = run
        .stdout
        .lines()
        .find(|l| l.contains("No space left"))
        .unwrap();
    assert_eq!(error.matches("No space left").count(), 1, "{error}");
    // once there is room, the same run finishes
    drop(disk);
    let run = p.sdpipe(&["run", "p.toml"]);
    assert_eq!(run.code, 0, "{}{}", run.stdout, run.stderr);
}
