//! Framing of batched uploads: `[header length: u32 big-endian][header JSON][body 0][body 1]...`,
//! each body exactly as long as its item's declared size. Pure: no I/O, only bounds.

use std::ops::Range;

/// Largest header accepted.
pub const MAX_HEADER_BYTES: usize = 256 * 1024;

/// Why a batch frame is malformed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    /// Shorter than its length prefix says.
    #[error("batch body ends inside its header")]
    Truncated,
    /// Header over [`MAX_HEADER_BYTES`].
    #[error("batch header larger than {MAX_HEADER_BYTES} bytes")]
    HeaderTooLarge,
    /// The bodies do not add up to the declared sizes.
    #[error("batch bodies are {actual} bytes, the items declare {declared}")]
    SizeMismatch {
        /// Sum of the declared sizes.
        declared: u64,
        /// Bytes after the header.
        actual: u64,
    },
}

/// The frame's prefix: length and header; the bodies follow it.
pub fn prefix(header_json: &[u8]) -> Vec<u8> {
    let len = u32::try_from(header_json.len()).unwrap_or(u32::MAX);
    let mut out = Vec::with_capacity(4 + header_json.len());
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(header_json);
    out
}

/// Splits a frame into its header JSON and the range of the bodies.
pub fn split(frame: &[u8]) -> Result<(&[u8], Range<usize>), FrameError> {
    let len_bytes: [u8; 4] = frame
        .get(..4)
        .and_then(|b| b.try_into().ok())
        .ok_or(FrameError::Truncated)?;
    let len = usize::try_from(u32::from_be_bytes(len_bytes)).unwrap_or(usize::MAX);
    if len > MAX_HEADER_BYTES {
        return Err(FrameError::HeaderTooLarge);
    }
    let header = frame.get(4..4 + len).ok_or(FrameError::Truncated)?;
    Ok((header, 4 + len..frame.len()))
}

/// The byte range of each body within `bodies` (the range `split` returned), in item order.
pub fn body_ranges(bodies: Range<usize>, sizes: &[u64]) -> Result<Vec<Range<usize>>, FrameError> {
    let declared = sizes.iter().fold(0u64, |a, s| a.saturating_add(*s));
    let actual = (bodies.end - bodies.start) as u64;
    if declared != actual {
        return Err(FrameError::SizeMismatch { declared, actual });
    }
    let mut at = bodies.start;
    Ok(sizes
        .iter()
        .map(|s| {
            // Fits: the sum equals a real length.
            let end = at + usize::try_from(*s).unwrap_or(0);
            let r = at..end;
            at = end;
            r
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_bounds() {
        let mut frame = prefix(br#"{"items":[]}"#);
        frame.extend_from_slice(b"abcdef");
        let (h, rest) = split(&frame).unwrap();
        assert_eq!(h, br#"{"items":[]}"#);
        let r = body_ranges(rest.clone(), &[2, 0, 4]).unwrap();
        assert_eq!(&frame[r[0].clone()], b"ab");
        assert!(frame[r[1].clone()].is_empty());
        assert_eq!(&frame[r[2].clone()], b"cdef");
        assert_eq!(
            body_ranges(rest.clone(), &[2, 5]),
            Err(FrameError::SizeMismatch {
                declared: 7,
                actual: 6
            })
        );
        assert_eq!(
            body_ranges(rest, &[u64::MAX, 7]).unwrap_err(),
            FrameError::SizeMismatch {
                declared: u64::MAX,
                actual: 6
            }
        );
        assert_eq!(split(&[0, 0]), Err(FrameError::Truncated));
        assert_eq!(split(&[0, 0, 0, 9, b'{']), Err(FrameError::Truncated));
        assert_eq!(split(&[0, 0x10, 0, 0]), Err(FrameError::HeaderTooLarge));
    }
}
