//! The tiny test guest (a 64-bit ELF the tests write themselves) and waiting for a guest's
//! console line.

use std::time::{Duration, Instant};

use super::*;

/// Banner the tiny guest prints on its serial port.
pub const TINY_MARKER: &str = "METALD_TINY_GUEST_READY";

/// How often a bench reads a console file for the banner, for metald's boots and the bare
/// VMMs alike: a thread's sleep (tokio's timer rounded the bare ones' up to 1-2 ms). Every
/// 250 µs, the reads took enough of the 2 cores to slow the boots beside them (the scale
/// bench's run G3: metald's process 15.0 CPU s for the 1000 boots, against 10.4-12.5).
pub const BANNER_POLL: Duration = Duration::from_millis(1);

/// Waits until the console file `console` holds the tiny guest's banner, reading it every
/// [`BANNER_POLL`]; panics once `limit` has passed since `t0`.
pub fn wait_for_banner(console: &std::path::Path, t0: Instant, limit: Duration) {
    while !std::fs::read_to_string(console).is_ok_and(|c| c.contains(TINY_MARKER)) {
        assert!(t0.elapsed() < limit, "no banner in {}", console.display());
        std::thread::sleep(BANNER_POLL);
    }
}

/// Where the ELF's single segment is loaded and run: Firecracker's loader wants the entry at or
/// above 1 MiB and loads segments at their physical address.
const LOAD_ADDR: u64 = 0x10_0000;
const HEADERS: u64 = 64 + 56;

/// What the tiny guest does after its banner.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TinyGuest {
    /// Polls the keyboard controller until a key arrives (Ctrl-Alt-Del from a graceful stop),
    /// then resets: its vCPU is always busy, every poll an exit to the VMM.
    Polling,
    /// Halts with interrupts off: an idle vCPU that no stop request wakes (stop it by force).
    Halted,
    /// Prints a `.` on the serial port every 2^26 TSC cycles (tens of milliseconds, however
    /// fast the host runs guest code), and polls the keyboard controller between dots like
    /// `Polling`: its console grows exactly while its vCPU runs.
    Counting,
}

/// What the counting guest prints for each step.
pub const TINY_TICK: char = '.';

/// The tiny Firecracker test guest: an ELF64 executable with one PT_LOAD segment.
pub fn tiny_guest_elf(kind: TinyGuest) -> Vec<u8> {
    let mut code: Vec<u8> = vec![0x66, 0xba, 0xf8, 0x03]; // mov dx, 0x3f8 (COM1)
    for b in format!("{TINY_MARKER}\n").bytes() {
        code.extend([0xb0, b, 0xee]); // mov al, b; out dx, al
    }
    if kind == TinyGuest::Halted {
        code.push(0xfa); // cli
    } else if kind == TinyGuest::Counting {
        // tick: wait 2^26 TSC cycles (tens of ms at any speed the vCPU runs at), print a dot,
        // poll the keyboard, again until a key.
        code.extend([0x0f, 0x31]); //                  tick:  rdtsc
        code.extend([0x89, 0xc3]); //                         mov ebx, eax
        code.extend([0x0f, 0x31]); //                  wait:  rdtsc
        code.extend([0x29, 0xd8]); //                         sub eax, ebx
        code.extend([0x3d, 0x00, 0x00, 0x00, 0x04]); //       cmp eax, 0x4000000
        code.extend([0x72, 0xf5]); //                         jb wait     (back 11 bytes)
        code.extend([0x66, 0xba, 0xf8, 0x03]); //             mov dx, 0x3f8 (rdtsc took edx)
        code.extend([0xb0, TINY_TICK as u8]); //              mov al, '.'
        code.push(0xee); //                                   out dx, al  (COM1)
        code.extend([0xe4, 0x64]); //                         in al, 0x64 (i8042 status)
        code.extend([0xa8, 0x01]); //                         test al, 1  (a key was pressed)
        code.extend([0x74, 0xe4]); //                         jz tick     (back 28 bytes)
        code.extend([0xb0, 0xfe, 0xe6, 0x64]); //             i8042 reset: Firecracker exits
    } else {
        code.extend([
            0xf3, 0x90, // wait: pause
            0xe4, 0x64, //       in al, 0x64   (i8042 status)
            0xa8, 0x01, //       test al, 1    (output buffer full: a key was pressed)
            0x74, 0xf8, //       jz wait
            0xb0, 0xfe, //       mov al, 0xfe
            0xe6, 0x64, //       out 0x64, al  (i8042 reset: Firecracker exits)
        ]);
    }
    code.extend([
        0xf4, //       halt: hlt
        0xeb, 0xfd, //       jmp halt
    ]);
    let size = HEADERS + code.len() as u64;
    let mut elf = Vec::new();
    elf.extend([0x7f, b'E', b'L', b'F', 2, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
    elf.extend(2u16.to_le_bytes()); // ET_EXEC
    elf.extend(0x3eu16.to_le_bytes()); // x86-64
    elf.extend(1u32.to_le_bytes());
    elf.extend((LOAD_ADDR + HEADERS).to_le_bytes()); // entry: the code right after the headers
    elf.extend(64u64.to_le_bytes()); // program headers right after this header
    elf.extend(0u64.to_le_bytes()); // no section headers
    elf.extend(0u32.to_le_bytes());
    elf.extend(64u16.to_le_bytes());
    elf.extend(56u16.to_le_bytes());
    elf.extend(1u16.to_le_bytes());
    elf.extend(64u16.to_le_bytes());
    elf.extend(0u16.to_le_bytes());
    elf.extend(0u16.to_le_bytes());
    assert_eq!(elf.len(), 64);
    elf.extend(1u32.to_le_bytes()); // PT_LOAD
    elf.extend(5u32.to_le_bytes()); // R+X
    elf.extend(0u64.to_le_bytes()); // from file offset 0
    elf.extend(LOAD_ADDR.to_le_bytes());
    elf.extend(LOAD_ADDR.to_le_bytes());
    elf.extend(size.to_le_bytes());
    elf.extend(size.to_le_bytes());
    elf.extend(0x1000u64.to_le_bytes());
    assert_eq!(elf.len() as u64, HEADERS);
    elf.extend(code);
    elf
}

/// Polls the VM's console through the API every `every` until `marker` shows up.
pub fn wait_for_console(
    api: &Rest,
    id: &str,
    marker: &str,
    t0: Instant,
    limit: Duration,
    every: Duration,
) {
    loop {
        let c = api
            .call(
                "GET",
                &format!("/v1/vms/{id}/console?tail_bytes=4096"),
                None,
            )
            .ok();
        if c["output"].as_str().unwrap_or("").contains(marker) {
            return;
        }
        assert!(
            t0.elapsed() < limit,
            "guest printed no {marker} within {limit:?}"
        );
        std::thread::sleep(every);
    }
}
