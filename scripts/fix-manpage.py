#!/usr/bin/env python3
"""Post-processes one page of swift-argument-parser's generate-manual (mdoc) for Debian (scripts/build-deb.sh):
subcommand pages are named dysco-migrate-<command> (not dysco-migrate.<command>): the NAME section's .Nm becomes
that one word (whatis), the SYNOPSIS still shows the command as typed; blank lines (paragraph breaks of a discussion)
become .Pp, which groff wants. Usage: fix-manpage.py IN OUT"""
import re
import sys

text = open(sys.argv[1], encoding="utf-8").read()
text = re.sub(r"\b(dysco-migrate|DYSCO-MIGRATE)((?:\.[A-Za-z][A-Za-z-]*)+)",
              lambda m: m.group(1) + m.group(2).replace(".", "-"), text)
lines = text.split("\n")
out, section, command = [], None, None
for line in lines:
    if line.startswith(".Sh "):
        section = line[4:].strip()
    if section == "NAME" and line.startswith(".Nm "):
        command = line[4:].strip().strip('"')
        line = ".Nm " + command.replace(" ", "-")
    elif line == ".Nm" and command and " " in command:
        line = '.Nm "%s"' % command
    elif line.strip() == "":
        if out and out[-1] == ".Pp":
            continue
        line = ".Pp"
    out.append(line)
while out and out[-1] == ".Pp":
    out.pop()
open(sys.argv[2], "w", encoding="utf-8").write("\n".join(out) + "\n")
