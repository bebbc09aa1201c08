# shadowplane %posttrans: runs last, once the old version's files are gone.
# The venv ships without bytecode: compile it once, since the sandboxed daemons cannot write it themselves.
/opt/shadowplane/venv/bin/python3 -m compileall -q -j 0 /opt/shadowplane/venv/lib >/dev/null 2>&1 || :
if [ -d /run/systemd/system ]; then
    systemctl daemon-reload >/dev/null 2>&1 || :
    # An upgraded controller restarts into the new version; the agent is restarted when the operator chooses,
    # since its service addresses are released while it restarts (operations.md, "Upgrades").
    systemctl try-restart shadowplane-controller.service >/dev/null 2>&1 || :
fi
exit 0
