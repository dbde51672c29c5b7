//! `LoopDisk`: an ext4 file system on a loop device the test owns, and its *crash image*: a
//! copy of exactly what reached the device, as a power cut would leave it.
//!
//! A `kill -9` keeps the page cache, so a durability test built on it passes even with every
//! fsync removed. Here the image is a copy of the loop device's backing file taken while the
//! file system is still mounted: it holds what the file system sent to the device (everything
//! fsync made durable, as fsync waits for the device) and nothing still dirty in the page
//! cache. Mount options keep the kernel from writing dirty data on its own during a test:
//! `commit=600` (no periodic journal commit), `noauto_da_alloc` (no early write-back on
//! replace-by-rename); delayed allocation (ext4's default) keeps unsynced data out of the
//! journal, and the flusher writes back only data older than 30 s. So what an fsync should
//! have made durable and did not is missing from the image, unless a later fsync on the same
//! file system happened to cover it (ext4 has one journal: a directory entry is made durable
//! by the next fsync of anything), or the test ran longer than the flusher's 30 s. Needs root
//! and loop devices.

use std::path::{Path, PathBuf};
use std::process::Command;

/// An ext4 file system on a loop device, mounted in a temp dir; unmounted on drop (the loop
/// device is set to detach itself then, also if the test panics halfway).
pub struct LoopDisk {
    root: tempfile::TempDir,
    /// Where it is mounted.
    pub path: PathBuf,
}

fn run(cmd: &str, args: &[&str]) -> String {
    let out = Command::new(cmd).args(args).output().unwrap();
    assert!(
        out.status.success(),
        "{cmd} {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

impl LoopDisk {
    /// A fresh file system of `bytes` (sparse).
    pub fn new(bytes: u64) -> LoopDisk {
        let root = tempfile::tempdir().unwrap();
        let image = root.path().join("disk.img");
        std::fs::File::create(&image)
            .unwrap()
            .set_len(bytes)
            .unwrap();
        run("mkfs.ext4", &["-q", "-F", image.to_str().unwrap()]);
        LoopDisk::attach(root, image)
    }

    fn attach(root: tempfile::TempDir, image: PathBuf) -> LoopDisk {
        let path = root.path().join("mnt");
        std::fs::create_dir_all(&path).unwrap();
        // `-o loop` sets the loop device to detach itself when the file system is unmounted.
        run(
            "mount",
            &[
                "-t",
                "ext4",
                "-o",
                "loop,commit=600,noauto_da_alloc",
                image.to_str().unwrap(),
                path.to_str().unwrap(),
            ],
        );
        LoopDisk { root, path }
    }

    /// What a power cut now would leave on the disk, mounted as a disk of its own (mounting
    /// replays ext4's journal, as booting after the cut would). Take it once the processes
    /// writing to the disk have exited: a process killed inside fsync exits only after the
    /// fsync returns, so no journal commit of theirs is half-written into the copy.
    pub fn crash_image(&self) -> LoopDisk {
        let root = tempfile::tempdir().unwrap();
        let image = root.path().join("disk.img");
        // Read through the backing file: the loop device's writes, not the mounted file
        // system's dirty pages.
        run(
            "cp",
            &[
                "--sparse=always",
                self.root.path().join("disk.img").to_str().unwrap(),
                image.to_str().unwrap(),
            ],
        );
        LoopDisk::attach(root, image)
    }

    /// A path on the disk.
    pub fn join(&self, rel: impl AsRef<Path>) -> PathBuf {
        self.path.join(rel)
    }
}

impl Drop for LoopDisk {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.path).status();
    }
}
