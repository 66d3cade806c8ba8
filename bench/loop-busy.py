#!/usr/bin/env python3
"""Samples, every second while the bench's courtside server lives: the endpoint loop's busy share
(courtside_webtransport_loop_busy_seconds_total), the server's CPU (cores) and its busiest
threads' CPU. Start it, then the bench (a release build): python3 bench/loop-busy.py OUT.txt &
It follows the first `target/release/courtside serve` process and stops when that one exits."""
import os, re, subprocess, sys, time, urllib.request
out = open(sys.argv[1], 'w')
def pid_of():
    r = subprocess.run(['pgrep', '-f', 'target/release/courtside serve'], capture_output=True, text=True)
    return int(r.stdout.split()[0]) if r.stdout.split() else None
pid = None
while pid is None:
    pid = pid_of(); time.sleep(0.1)
port = None
while port is None:
    r = subprocess.run(['ss', '-ltnp'], capture_output=True, text=True).stdout
    for line in r.splitlines():
        if f'pid={pid},' in line:
            m = re.search(r'127\.0\.0\.1:(\d+)', line)
            if m: port = m.group(1); break
    time.sleep(0.1)
def busy():
    try:
        body = urllib.request.urlopen(f'http://127.0.0.1:{port}/metrics', timeout=2).read().decode()
    except Exception:
        return None, None
    # One series per endpoint loop (endpoint_loop="N"): summed.
    loops = re.findall(r'^courtside_webtransport_loop_busy_seconds_total\{[^}]*\} (\S+)', body, re.M)
    b = sum(float(v) for v in loops) if loops else None
    c = re.search(r'^courtside_connections\{transport="webtransport"\} (\S+)', body, re.M)
    return b, (c.group(1) if c else None)
def threads():
    t = {}
    try:
        for tid in os.listdir(f'/proc/{pid}/task'):
            s = open(f'/proc/{pid}/task/{tid}/stat').read()
            name = s[s.index('(')+1:s.rindex(')')]
            f = s[s.rindex(')')+2:].split()
            t[tid] = (name, int(f[11]) + int(f[12]))
    except Exception:
        pass
    return t
prev_t, (prev_b, _), prev_th = time.time(), busy(), threads()
while os.path.exists(f'/proc/{pid}'):
    time.sleep(1.0)
    now, (b, conns), th = time.time(), busy(), threads()
    if b is None: break
    dt = now - prev_t
    per = sorted(((th[k][1] - prev_th.get(k, (0, 0))[1]) / 100 / dt, th[k][0]) for k in th)[::-1][:3]
    total = sum((th[k][1] - prev_th.get(k, (0, 0))[1]) for k in th) / 100 / dt
    out.write(f'{time.strftime("%T")} wt={conns} loop_busy={(b - prev_b) / dt:.2f} server_cores={total:.2f} top_threads=' + ' '.join(f'{n}:{c:.2f}' for c, n in per) + '\n')
    out.flush()
    prev_t, prev_b, prev_th = now, b, th
