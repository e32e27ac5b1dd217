-- Hold requests while a backend is down, instead of refusing them: `hop migrate --haproxy`
-- puts the application's server in MAINT before the freeze and READY (at its new address)
-- after the restore; requests that arrive in between wait here and then go to the new address.
--
--   http-request lua.hold_until_up <backend> <max_ms>
--   tcp-request content lua.hold_until_up <backend> <max_ms>   (with tcp-request inspect-delay)
core.register_action("hold_until_up", { "http-req", "tcp-req" }, function(txn, be_name, max_ms)
    local be = core.backends[be_name]
    local limit = tonumber(max_ms) or 30000
    local waited = 0
    while waited < limit and be:get_stats()["status"] ~= "UP" do
        core.msleep(10) -- a non-blocking sleep: the request is parked, not refused
        waited = waited + 10
    end
end, 2)
