# shadowplane %preun ($1: 0 on erase, 1 on upgrade)
if [ "$1" -eq 0 ]; then
    if [ -d /run/systemd/system ]; then
        systemctl --no-reload disable --now shadowplane-agentd.service shadowplane-controller.service \
            >/dev/null 2>&1 || :
    fi
fi
exit 0
