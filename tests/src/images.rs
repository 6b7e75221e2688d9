//! The images the tests run: those of [`seine_image`], and the pod sandbox image of seine-pause
//! as built for the tests.

use anyhow::Result;
pub use seine_image::{build, busybox, with_libraries, ImageSpec};

/// The pod sandbox image: seine-pause with the libraries it loads.
pub fn pause(reference: &str) -> Result<ImageSpec> {
    let binary = crate::bin("seine-pause")?;
    Ok(ImageSpec {
        reference: reference.into(),
        files: with_libraries(&binary, "/pause")?,
        links: vec![],
        entrypoint: vec!["/pause".into()],
        cmd: vec![],
    })
}
