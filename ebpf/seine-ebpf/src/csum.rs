//! Internet checksums over small stack buffers, for packets the datapath writes from scratch.

use aya_ebpf::helpers::bpf_csum_diff;

/// One's-complement checksum of `words` (which must already hold 0 in the checksum field).
#[inline(always)]
pub fn checksum<const N: usize>(words: &mut [u32; N]) -> u16 {
    // SAFETY: `words` is initialised stack memory of exactly N * 4 bytes.
    let sum = unsafe {
        bpf_csum_diff(
            core::ptr::null_mut(),
            0,
            words.as_mut_ptr(),
            (N * 4) as u32,
            0,
        )
    };
    fold(sum as u64)
}

#[inline(always)]
fn fold(mut sum: u64) -> u16 {
    sum = (sum & 0xffff_ffff) + (sum >> 32);
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    !(sum as u16)
}
