# What is observed after every power cut, shared by the guest (busybox sh, guest/init) and the
# host (bash, for log-writes replays and the self-test), so both check the same way.
#
#   . check.sh; pc_check ID POLICY SCENARIO MOUNT_CS
#
# With the cut filesystem mounted at $MNT (MNT/root, MNT/state, MNT/cfg-POLICY.toml):
#   1. `recover` (its output tells whether the cut left a transaction in flight), again (must
#      be a no-op), `status --json`, the dump of the tree (lib/dump.sh) and its hash;
#   2. when the hash is one of the two sides of SCENARIO (a `post` line of $PC_POST names it):
#      `verify`, then the post-cut operations that line lists, each followed by a dump: a
#      rollback to the previous generation, to the factory, or a second install when nothing is
#      installed; each must exit 0 and leave the tree whose hash the line gives (lib/oracle.py's
#      prediction). The first one that fails ends the sequence.
# Needs BIN (the engine), MNT, PC_DUMP (dump.sh), PC_EXPECT (a file of dump hashes that need no
# @@DUMP), PC_POST (a file of `post SCENARIO SIDE_HASH OP=HASH...` lines; OP: rollback, factory
# or install:PKG for `install --force MNT/pkg/PKG`), BB (busybox), PC_TMP (a private scratch directory). Prints on stdout:
#
#   @@CHECK ID mount=ok mount_cs= recover_rc= recover_cs= recover2_rc= status_rc= check_cs= post_cs= dump=HASH
#   @@OUT ID rec1|rec2|status-err|verify|post-OP: <engine output>
#   @@STATUS ID <status --json>
#   @@DUMP ID <line>              the dump, only when its hash is not in $PC_EXPECT
#   @@VERIFY ID rc=N cs=N
#   @@POST ID op=OP rc=N dump=HASH want=HASH cs=N dump_cs=N
#   @@PDUMP ID OP <line>          the dump after OP, only when it is not the expected one

pc_cs() { $BB awk '{ printf "%d\n", $1 * 100 }' /proc/uptime; }

pc_check() {
    pc_id=$1 pc_pol=$2 pc_scn=$3 pc_mcs=${4:-0}
    pc_c=$MNT/cfg-$pc_pol.toml
    pc_t0=$(pc_cs)
    timeout 300 "$BIN" --config "$pc_c" recover >"$PC_TMP/rec" 2>&1
    pc_rrc=$?
    pc_t1=$(pc_cs)
    timeout 120 "$BIN" --config "$pc_c" recover >"$PC_TMP/rec2" 2>&1
    pc_rrc2=$?
    timeout 120 "$BIN" --config "$pc_c" status --json >"$PC_TMP/st" 2>"$PC_TMP/ste"
    pc_src=$?
    BB=$BB $BB sh "$PC_DUMP" "$MNT" >"$PC_TMP/dump"
    pc_h=$($BB sha256sum "$PC_TMP/dump" | $BB cut -d' ' -f1)
    pc_t2=$(pc_cs)
    $BB sed "s/^/@@OUT $pc_id rec1: /" "$PC_TMP/rec"
    $BB sed "s/^/@@OUT $pc_id rec2: /" "$PC_TMP/rec2"
    $BB sed "s/^/@@OUT $pc_id status-err: /" "$PC_TMP/ste"
    echo "@@STATUS $pc_id $($BB tr -d '\n' <"$PC_TMP/st")"
    if ! $BB grep -q " $pc_h" "$PC_EXPECT" 2>/dev/null; then
        $BB sed "s/^/@@DUMP $pc_id /" "$PC_TMP/dump"
    fi
    pc_post=$($BB grep -m1 "^post $pc_scn $pc_h " "$PC_POST" 2>/dev/null)
    if [ -n "$pc_post" ]; then
        pc_ta=$(pc_cs)
        timeout 300 "$BIN" --config "$pc_c" verify >"$PC_TMP/ver" 2>&1
        pc_vrc=$?
        echo "@@VERIFY $pc_id rc=$pc_vrc cs=$(($(pc_cs) - pc_ta))"
        $BB sed "s/^/@@OUT $pc_id verify: /" "$PC_TMP/ver"
        for pc_item in ${pc_post#post $pc_scn $pc_h }; do
            pc_op=${pc_item%%=*} pc_want=${pc_item#*=}
            case $pc_op in
                rollback) set -- rollback ;;
                factory) set -- rollback --to factory ;;
                install:*) set -- install --force "$MNT/pkg/${pc_op#install:}" ;;
                *) echo "@@POST $pc_id op=$pc_op rc=unknown-op dump=- want=$pc_want"; break ;;
            esac
            pc_ta=$(pc_cs)
            timeout 300 "$BIN" --config "$pc_c" "$@" >"$PC_TMP/op" 2>&1
            pc_orc=$?
            pc_tb=$(pc_cs)
            BB=$BB $BB sh "$PC_DUMP" "$MNT" >"$PC_TMP/pdump"
            pc_ph=$($BB sha256sum "$PC_TMP/pdump" | $BB cut -d' ' -f1)
            echo "@@POST $pc_id op=$pc_op rc=$pc_orc dump=$pc_ph want=$pc_want cs=$((pc_tb - pc_ta)) dump_cs=$(($(pc_cs) - pc_tb))"
            $BB sed "s/^/@@OUT $pc_id post-$pc_op: /" "$PC_TMP/op"
            [ "$pc_ph" = "$pc_want" ] || $BB sed "s/^/@@PDUMP $pc_id $pc_op /" "$PC_TMP/pdump"
            [ "$pc_orc" = 0 ] && [ "$pc_ph" = "$pc_want" ] || break
        done
    fi
    pc_t3=$(pc_cs)
    echo "@@CHECK $pc_id mount=ok mount_cs=$pc_mcs recover_rc=$pc_rrc recover_cs=$((pc_t1 - pc_t0)) recover2_rc=$pc_rrc2 status_rc=$pc_src check_cs=$((pc_t2 - pc_t0)) post_cs=$((pc_t3 - pc_t2)) dump=$pc_h"
}
