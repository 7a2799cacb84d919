import grpc
def test_probe(stub, pb, server):
    T = pb.TaskRef
    reqs = {
     "unknown": pb.InferRequest(tasks=[T(name="nope")], texts=pb.Texts(texts=["hi"])),
     "emptylist": pb.InferRequest(tasks=[T(name="sent")], texts=pb.Texts(texts=[])),
     "emptystr": pb.InferRequest(tasks=[T(name="sent")], texts=pb.Texts(texts=[""])),
     "noinput": pb.InferRequest(tasks=[T(name="sent")]),
     "notasks": pb.InferRequest(texts=pb.Texts(texts=["hi"])),
     "range": pb.InferRequest(tasks=[T(name="sent", drop_first=3)], texts=pb.Texts(texts=["hi"])),
     "nonrobust": pb.InferRequest(tasks=[T(name="sent-spec", drop_first=0)], texts=pb.Texts(texts=["hi"])),
     "mixbb": pb.InferRequest(tasks=[T(name="sent"), T(name="rsent")], texts=pb.Texts(texts=["hi"])),
     "badver": pb.InferRequest(tasks=[T(name="sent", version=9)], texts=pb.Texts(texts=["hi"])),
     "multi": pb.InferRequest(tasks=[T(name="sent"), T(name="topic", drop_first=1)], texts=pb.Texts(texts=["hi", "Привет мир 你好世界 مرحبا"])),
     "long": pb.InferRequest(tasks=[T(name="sent")], texts=pb.Texts(texts=["word " * 5000])),
    }
    for k, r in reqs.items():
        try:
            resp = stub.Infer(r, timeout=10)
            print(k, "OK", [ (x.task, list(x.dropped_layers), [s.label for s in x.sequences]) for x in resp.results], list(resp.num_tokens))
        except grpc.RpcError as e:
            print(k, e.code(), e.details())
    for n in ["nope", "sent"]:
        try: stub.GetTask(pb.GetTaskRequest(name=n)); print(n, "ok")
        except grpc.RpcError as e: print(n, e.code(), e.details())
    for tn in ["sent-spec", "sent-layers", "sent"]:
        r = stub.Infer(pb.InferRequest(tasks=[T(name=tn)], texts=pb.Texts(texts=["hi"])))
        print(tn, list(r.results[0].dropped_layers))
