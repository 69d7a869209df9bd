//! The cache never serves or keeps bad bytes: each test damages the cache or a published output
//! the way a disk, an editor or a user would, and checks the next run notices, moves the damaged
//! file to `quarantine/`, recomputes or restores, and ends with the bytes a clean run gives.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use crate::common::{PipelineToml, Project};

const MANIFEST: &str = "outputs/t/preprocess/manifest.json";

fn cache(p: &Project) -> PathBuf {
    p.path(".sdpipe/cache-v1")
}

fn quarantined(p: &Project) -> usize {
    std::fs::read_dir(cache(p).join("quarantine"))
        .map(|d| d.count())
        .unwrap_or(0)
}

/// Overwrites one byte of `path` in place, keeping its size (the file is read-only: a user
/// with the rights, or a disk, can still change it).
fn flip_a_byte(path: &Path) {
    let mut perms = std::fs::metadata(path).unwrap().permissions();
    perms.set_mode(0o644);
    std::fs::set_permissions(path, perms).unwrap();
    let mut bytes = std::fs::read(path).unwrap();
    let i = bytes.len() / 2;
    bytes[i] ^= 0x20;
    // write through the same inode, as an in-place edit does
    use std::io::Write;
    let mut f = std::fs::OpenOptions::new().write(true).open(path).unwrap();
    f.write_all(&bytes).unwrap();
}

fn run_ok(p: &Project) -> String {
    let run = p.sdpipe(&["run", "p.toml"]);
    assert_eq!(run.code, 0, "{}{}", run.stdout, run.stderr);
    run.stderr
}

#[test]
fn an_output_edited_in_place_is_not_served_and_is_recomputed() {
    let p = Project::new(PipelineToml::basic());
    run_ok(&p);
    let good = std::fs::read(p.path(MANIFEST)).unwrap();
    // The output is a hard link to the blob: the edit reaches the cache.
    flip_a_byte(&p.path(MANIFEST));
    let stderr = run_ok(&p);
    assert_eq!(p.outcome("preprocess"), "computed", "{stderr}");
    assert!(
        stderr.contains("moved to"),
        "the repair is reported: {stderr}"
    );
    assert_eq!(std::fs::read(p.path(MANIFEST)).unwrap(), good);
    assert_eq!(quarantined(&p), 1);
    assert_eq!(p.sdpipe(&["cache", "verify"]).code, 0);
    // and the repaired entry is served again
    run_ok(&p);
    assert_eq!(p.outcome("preprocess"), "cached");
}

#[test]
fn bit_rot_is_found_by_verify_and_recomputed_by_the_next_run() {
    let p = Project::new(PipelineToml::basic());
    run_ok(&p);
    let good = std::fs::read(p.path(MANIFEST)).unwrap();
    flip_a_byte(&p.path(MANIFEST));
    let verify = p.sdpipe(&["cache", "verify"]);
    assert_eq!(verify.code, 3, "{}{}", verify.stdout, verify.stderr);
    assert!(
        verify.stdout.contains("does not match its digest"),
        "{}",
        verify.stdout
    );
    assert_eq!(quarantined(&p), 1, "verify moves the damaged blob aside");
    assert_eq!(p.status_of("preprocess").0, "stale");
    run_ok(&p);
    assert_eq!(p.outcome("preprocess"), "computed");
    assert_eq!(std::fs::read(p.path(MANIFEST)).unwrap(), good);
    assert_eq!(p.sdpipe(&["cache", "verify"]).code, 0);
}

#[test]
fn a_deleted_or_replaced_output_is_restored() {
    let p = Project::new(PipelineToml::basic());
    run_ok(&p);
    let good = std::fs::read(p.path(MANIFEST)).unwrap();

    std::fs::remove_file(p.path(MANIFEST)).unwrap();
    let (status, reason) = p.status_of("preprocess");
    assert_eq!(status, "fresh", "nothing to compute");
    assert!(
        reason.contains("manifest.json was deleted or changed"),
        "{reason}"
    );
    run_ok(&p);
    assert_eq!(p.outcome("preprocess"), "cached");
    assert_eq!(std::fs::read(p.path(MANIFEST)).unwrap(), good);

    // An editor that writes a new file and renames it over the old one leaves the cache intact.
    std::fs::remove_file(p.path(MANIFEST)).unwrap();
    std::fs::write(p.path(MANIFEST), b"{\"edited\": true}").unwrap();
    run_ok(&p);
    assert_eq!(p.outcome("preprocess"), "cached");
    assert_eq!(std::fs::read(p.path(MANIFEST)).unwrap(), good);
    assert_eq!(p.status_of("preprocess"), ("fresh".into(), String::new()));
    assert_eq!(quarantined(&p), 0);
}

#[test]
fn a_corrupt_record_is_a_miss_not_a_failed_run() {
    let p = Project::new(PipelineToml::basic());
    run_ok(&p);
    let records = cache(&p).join("records/stages");
    for e in std::fs::read_dir(&records).unwrap().flatten() {
        std::fs::write(e.path(), b"{ truncated").unwrap();
    }
    run_ok(&p);
    assert_eq!(p.outcome("caption"), "computed");
    assert_eq!(p.outcome("preprocess"), "computed");
    assert_eq!(quarantined(&p), 2);
    assert_eq!(p.sdpipe(&["cache", "verify"]).code, 0);
}

#[test]
fn force_recomputes_every_item_and_rewrites_a_damaged_blob() {
    let p = Project::new(PipelineToml::basic());
    run_ok(&p);
    assert_eq!(p.stats("preprocess")["images_computed"], 6);
    let item = p.path("outputs/t/preprocess/items/zorb-01.png.safetensors");
    let good = std::fs::read(&item).unwrap();
    flip_a_byte(&item);
    let run = p.sdpipe(&["run", "--force", "preprocess", "p.toml"]);
    assert_eq!(run.code, 0, "{}", run.stderr);
    assert_eq!(
        p.stats("preprocess")["images_computed"],
        6,
        "--force reuses no item"
    );
    assert_eq!(p.stats("preprocess")["images_reused"], 0);
    // the same bytes were computed again: the damaged blob of that name was replaced
    assert_eq!(std::fs::read(&item).unwrap(), good);
    assert_eq!(quarantined(&p), 1);
    assert_eq!(p.sdpipe(&["cache", "verify"]).code, 0);
}

/// `cache gc` while a run is writing used to delete the blobs the run had just written but not
/// yet committed (the run died with exit 3). gc now waits for the run, then collects.
#[test]
fn gc_during_a_run_waits_for_it() {
    let p = Project::new(PipelineToml::basic());
    let env = [
        ("SDPIPE_TEST_ITEM_DELAY_MS", "150"),
        ("RAYON_NUM_THREADS", "1"),
    ];
    let run = p.spawn(&["run", "p.toml"], &env);
    crate::common::wait_for("a preprocessed item", || {
        std::fs::read_dir(cache(&p).join("records/items")).is_ok_and(|mut d| d.next().is_some())
    });
    let gc = p.spawn(&["cache", "gc", "--max-age", "0s"], &[]);
    let run = run.wait_with_output().unwrap();
    let gc = gc.wait_with_output().unwrap();
    let run_err = String::from_utf8_lossy(&run.stderr);
    assert!(run.status.success(), "{run_err}");
    let gc_err = String::from_utf8_lossy(&gc.stderr);
    assert!(gc.status.success(), "{gc_err}");
    assert!(gc_err.contains("waiting for the runs using"), "{gc_err}");
    assert_eq!(p.sdpipe(&["cache", "verify"]).code, 0);
    assert!(p.plan().iter().all(|(_, s, _)| s == "fresh"));
}

/// A process killed mid-publish leaves `.<stage>.new-<pid>/`; the next publish in that
/// pipeline folder, or `cache gc`, removes it.
#[test]
fn stale_publish_folders_are_swept() {
    let p = Project::new(PipelineToml::basic());
    run_ok(&p);
    let stale = p.path("outputs/t/.preprocess.new-999999");
    std::fs::create_dir_all(stale.join("items")).unwrap();
    std::fs::write(stale.join("manifest.json"), b"{}").unwrap();
    let dry = p.sdpipe(&["cache", "gc", "--dry-run"]);
    assert_eq!(dry.code, 0, "{}", dry.stderr);
    assert!(stale.exists(), "a dry run removes nothing");
    let gc = p.sdpipe(&["cache", "gc"]);
    assert_eq!(gc.code, 0, "{}", gc.stderr);
    assert!(!stale.exists());

    std::fs::create_dir_all(p.path("outputs/t/.caption.old-123")).unwrap();
    p.write_pipeline(PipelineToml::basic().set("stage.preprocess.resolution", 40));
    run_ok(&p);
    assert!(!p.path("outputs/t/.caption.old-123").exists());
}
