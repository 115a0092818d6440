from broker.events import event_type, parse_entry


def test_a_follower_reads_seq_from_the_entry_id_and_type_without_parsing():
    data = '{"seq":12,"job":"ab","ts":1.5,"type":"token","text":"\\"type\\":\\"done\\""}'
    event = parse_entry(b"12-1", {b"event": data.encode()})
    assert (event.seq, event.type, event.data) == (12, "token", data)


def test_every_event_type_is_read_back_exactly():
    for type_ in ("queued", "started", "token", "stage", "done", "error", "cancelled"):
        assert event_type(f'{{"seq":0,"job":"j","ts":1.0,"type":"{type_}"}}') == type_
