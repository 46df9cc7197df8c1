#!/usr/bin/perl
# Replays a dm-log-writes log onto a copy of the device it was recorded on, stopping at every
# crash-consistent point to let a hook check the device as it would be after a power cut there.
#
#   perl lwreplay.pl [--every-entry] LOG IMG HOOK [ARGS...]
#
# LOG is the raw log device; IMG must hold exactly what the logged device held when the
# log-writes target was created (it is modified in place). At every entry with the FLUSH or
# FUA flag (or every entry with --every-entry), if at least one write was applied since the
# previous point, runs `HOOK ARGS... <point index> <entry index> <flags> <marks>` where
# <marks> is a comma-separated list of the marks seen so far (or "-"). Exits with the number
# of failing points (capped at 100), 0 if every point passed.
#
# Log format (drivers/md/dm-log-writes.c): a super block at offset 0
# (magic u64, version u64, nr_entries u64, sectorsize u32, little endian); entries from
# offset `sectorsize`, each one sector of header (sector u64, nr_sectors u64, flags u64,
# data_len u64; a mark's text follows the header inside that sector), followed for a write
# by nr_sectors * sectorsize bytes of data. Writes are logged in completion order; a flush
# entry comes after every write that completed before it; a FUA write is logged when it
# completes. Sector numbers are in units of sectorsize.
use strict;
use warnings;

use constant { FLUSH => 1, FUA => 2, DISCARD => 4, MARK => 8, META => 16 };
use constant MAGIC => 0x6a736677736872;

my $every = 0;
if (@ARGV && $ARGV[0] eq '--every-entry') { $every = 1; shift @ARGV; }
die "usage: lwreplay.pl [--every-entry] LOG IMG HOOK [ARGS...]\n" unless @ARGV >= 3;
my ($log, $img, @hook) = @ARGV;

open(my $L, '<:raw', $log) or die "$log: $!\n";
open(my $I, '+<:raw', $img) or die "$img: $!\n";

sub rd {
    my ($fh, $off, $len) = @_;
    sysseek($fh, $off, 0) or die "seek: $!\n";
    my $buf = '';
    while (length($buf) < $len) {
        my $n = sysread($fh, $buf, $len - length($buf), length($buf));
        die "read: $!\n" unless defined $n;
        die "short read at $off\n" if $n == 0;
    }
    return $buf;
}

my ($magic, $version, $nr, $ss) = unpack('Q< Q< Q< L<', rd($L, 0, 28));
die sprintf("not a dm-log-writes log (magic %#x)\n", $magic) unless $magic == MAGIC;
die "log version $version\n" unless $version == 1;
print STDERR "lwreplay: $nr entries, sector size $ss\n";

my $off = $ss;
my ($points, $fails, $dirty, $writes, $bytes) = (0, 0, 0, 0, 0);
my @marks;
my $zero = "\0" x (1 << 20);

sub point {
    my ($idx, $flags) = @_;
    return unless $dirty;
    $dirty = 0;
    $points++;
    my @f;
    push @f, 'flush' if $flags & FLUSH;
    push @f, 'fua' if $flags & FUA;
    push @f, 'end' if $flags == -1;
    push @f, 'entry' unless @f;
    my $rc = system(@hook, $points, $idx, join('+', @f), @marks ? join(',', @marks) : '-');
    $fails++ if $rc != 0;
}

for my $i (0 .. $nr - 1) {
    my ($sector, $nsec, $flags, $dlen) = unpack('Q< Q< Q< Q<', rd($L, $off, 32));
    if ($flags & MARK) {
        my $text = substr(rd($L, $off + 32, $dlen), 0, $dlen);
        push @marks, $text;
        $off += $ss;
        next;
    }
    $off += $ss;
    if ($flags & DISCARD) {
        # Discarded blocks read back as anything; zeros are one legal answer.
        my $len = $nsec * $ss;
        my $at = $sector * $ss;
        while ($len > 0) {
            my $n = $len > length($zero) ? length($zero) : $len;
            sysseek($I, $at, 0); syswrite($I, $zero, $n) == $n or die "write: $!\n";
            $at += $n; $len -= $n;
        }
        $dirty = 1;
    } elsif ($nsec > 0) {
        my $len = $nsec * $ss;
        my $data = rd($L, $off, $len);
        sysseek($I, $sector * $ss, 0) or die "seek: $!\n";
        syswrite($I, $data) == $len or die "write: $!\n";
        $off += $len;
        $dirty = 1;
        $writes++;
        $bytes += $len;
    }
    point($i, $flags) if $every || ($flags & (FLUSH | FUA));
}
$dirty = 1 if $points == 0;
point($nr, -1);
close($I) or die "$img: $!\n";
print STDERR "lwreplay: $writes writes, $bytes bytes, $points points checked, $fails failed\n";
exit($fails > 100 ? 100 : $fails);
