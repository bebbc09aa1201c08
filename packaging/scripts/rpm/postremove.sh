# shadowplane %postun ($1: 0 on erase, 1 on upgrade). The store in /var/lib/shadowplane is kept, as rpm
# packages do: remove it by hand to forget the fleet's history.
if [ -d /run/systemd/system ]; then
    systemctl daemon-reload >/dev/null 2>&1 || :
fi
exit 0
