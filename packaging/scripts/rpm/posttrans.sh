# shadowplane %posttrans: runs last, once the old version's files are gone.
# The venv's bytecode ships in the package (packaging/build.sh), so nothing is compiled here.
if [ -d /run/systemd/system ]; then
    systemctl daemon-reload >/dev/null 2>&1 || :
    # An upgraded controller restarts into the new version; the agent is restarted when the operator chooses,
    # since its service addresses are released while it restarts (operations.md, "Upgrades").
    systemctl try-restart shadowplane-controller.service >/dev/null 2>&1 || :
fi
exit 0
