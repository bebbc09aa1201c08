# shadowplane %preun ($1: 0 on erase, 1 on upgrade)
if [ "$1" -eq 0 ]; then
    if [ -d /run/systemd/system ]; then
        systemctl --no-reload disable --now shadowplane-agentd.service shadowplane-controller.service \
            >/dev/null 2>&1 || :
        # A stopped agent leaves its service addresses to their kernel lifetime (one lease) so that a restart
        # moves no VIP; an erased one is not coming back to renew them: let them go now.
        /usr/bin/shadowplane-agentd release-all --all --config /etc/shadowplane/agentd.toml >/dev/null 2>&1 || :
    fi
fi
exit 0
